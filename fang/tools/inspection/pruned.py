"""What each pruning run kept and how well it reconstructed each block, from its prune.json.

Per layer: KV groups (attention units) and FFN neurons kept, the relative reconstruction error
||W X - W' X'||^2 / ||W X||^2 of o_proj and down_proj on the first calibration sequences, and for
FANG the mean weight its groups put on their own cluster's tokens. Read side by side for several
runs, it shows where methods differ: FLAP's global search emptying some blocks' attention, OBC's
refit lowering the error, an allocation moving sparsity between blocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from ...core.errors import FangError, require


@dataclass
class PrunedRun:
    name: str  # file stem, e.g. "flap-0.2" or "prune"
    method: str
    allocation: str
    achieved: float
    layers: list[dict]

    def column(self, key: str, sub: str | None = None) -> list[float | None]:
        out = []
        for e in self.layers:
            v = e.get(key)
            if sub is not None:
                v = (v or {}).get(sub)
            if isinstance(v, list):  # own_cluster_weight: mean over groups
                v = sum(v) / len(v) if v else None
            out.append(v)
        return out


def read_runs(files: list[Path]) -> list[PrunedRun]:
    require(files, "no prune report given (artifacts/metrics/prune.json or artifacts/sweep/*.prune.json)")
    runs = []
    for f in files:
        if not f.exists():
            raise FangError(f"prune report not found: {f} (run `fang prune` or the sweep first)")
        try:
            d = json.loads(f.read_text())
            name = f.name[: -len(".prune.json")] if f.name.endswith(".prune.json") else f.stem
            runs.append(PrunedRun(name, d["method"], (d.get("options") or {}).get("allocation", "?"),
                                  float(d["achieved_sparsity"]), list(d["layers"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise FangError(f"{f} is not a prune report ({exc!r})") from None
    n = {len(r.layers) for r in runs}
    require(len(n) == 1, f"the prune reports cover different numbers of layers: {sorted(n)}")
    return runs


def structure_table(runs: list[PrunedRun]) -> Table:
    table = Table(title="kept per layer: KV groups / FFN neurons (down_proj relative reconstruction error)",
                  caption="error = ||W X - W' X'||^2 / ||W X||^2 on the first calibration sequences")
    table.add_column("layer", justify="right")
    for r in runs:
        table.add_column(f"{r.name}\n{r.method}, {r.allocation}\n{r.achieved:.1%}", justify="right")
    for li in range(len(runs[0].layers)):
        cells = []
        for r in runs:
            e = r.layers[li]
            err = (e.get("relative_error") or {}).get("down_proj")
            cells.append(f"{e.get('kv_heads', '?')} / {e.get('ffn', '?')}" + (f" ({err:.3f})" if err is not None else ""))
        table.add_row(str(li), *cells)
    return table


def plot(runs: list[PrunedRun], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("kv_heads", None, "KV groups kept"), ("ffn", None, "FFN neurons kept"),
              ("relative_error", "o_proj", "o_proj relative error"), ("relative_error", "down_proj", "down_proj relative error"),
              ("own_cluster_weight", None, "FANG: weight on own cluster")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (key, sub, title) in zip(axes, panels):
        for r in runs:
            ys = r.column(key, sub)
            if any(y is not None for y in ys):
                ax.plot(range(len(ys)), [float("nan") if y is None else y for y in ys], marker=".", label=r.name)
        ax.set(title=title, xlabel="layer")
        if "error" in title:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "pruned_structure.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
