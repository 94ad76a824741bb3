"""`fang inspect sparsity`: functional complexity and head/FFN sparsity per block."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from ...core import paths
from ...core.errors import FangError, require
from .common import _artifact, _num_column, _table


@dataclass
class Allocation:
    mode: str
    target: float
    mean: float
    fc: list[float]
    scores: list[float]
    attn: list[float]
    ffn: list[float]


def allocation(root: Path, target: float | None = None) -> Allocation:
    """Scores from allocate.json and the per-block sparsity of one sweep target from block_sparsity.json."""
    f = _artifact(root, paths.ALLOCATE)
    fs = _artifact(root, paths.BLOCK_SPARSITY)
    if not f.exists() or not fs.exists():
        raise FangError(f"sparsity allocation not found: {f if not f.exists() else fs} (run `dvc repro allocate` first)")
    try:
        a = json.loads(f.read_text())
        by_target = json.loads(fs.read_text())["by_target"]
        key = next((t for t in by_target if target is None or abs(float(t) - target) < 1e-9), None)
        require(key is not None, f"no allocation for target {target} in {fs}; targets: {', '.join(by_target)} (sweep.sparsities)")
        fc = [float(x) for x in a["functional_complexity"]]
        attn = [float(x) for x in by_target[key]["attn_sparsity"]]
        ffn = [float(x) for x in by_target[key]["ffn_sparsity"]]
        alloc = Allocation(
            mode=str(a.get("mode", "?")), target=float(key),
            mean=float(by_target[key].get("mean_sparsity", np.mean(ffn))),
            fc=fc, scores=[float(x) for x in (a.get("scores") or fc)], attn=attn, ffn=ffn,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise FangError(f"{f} is malformed ({exc!r}); rerun `dvc repro allocate`") from None
    require(len(fc) > 0 and len(fc) == len(attn) == len(ffn) == len(alloc.scores),
            f"{f} has empty or unequal per-layer lists; rerun `dvc repro allocate`")
    return alloc


def sparsity_table(a: Allocation) -> Table:
    table = _table(
        f"sparsity allocation ({a.mode}): target {a.target:.3f}, mean {a.mean:.3f}, "
        f"FFN range {min(a.ffn):.3f}..{max(a.ffn):.3f}",
        "FC = 1 - mean cos(block input, block output) (Eq. 8): blocks that change tokens more get less sparsity",
    )
    show_scores = a.scores != a.fc  # taylor mode allocates by block sensitivity, not FC
    for header in ["layer", "FC", *([f"{a.mode} score"] if show_scores else []), "attn sparsity", "FFN sparsity"]:
        _num_column(table, header)
    table.add_column("", no_wrap=True)
    top = max(max(a.ffn), max(a.attn), 1e-12)
    for li in range(len(a.fc)):
        bar = "█" * round(20 * a.ffn[li] / top)
        row = [str(li), f"{a.fc[li]:.4f}"] + ([f"{a.scores[li]:.4g}"] if show_scores else [])
        table.add_row(*row, f"{a.attn[li]:.3f}", f"{a.ffn[li]:.3f}", bar)
    return table
