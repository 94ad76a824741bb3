"""Two prunes of the same method and sparsity, one with model.compute_dtype float32 and one with bfloat16
(or any other pair): which units each kept per block, their perplexity and paired accuracies, and what
each stage cost. Writes one JSON.

    python studies/diagnostics/compute_dtype.py A_DIR B_DIR --out artifacts/diagnostics/compute_dtype.json \\
        [--metrics A.metrics.json B.metrics.json] [--timings A_timings.jsonl B_timings.jsonl]

A_DIR / B_DIR are pruned model directories (`fang prune --out DIR`, or artifacts/pruned); A is the
reference (float32). Units kept, per block:
  ffn       structure.json's kept_neurons (the dense indices of the kept FFN neurons), or, for
            checkpoints without them, gate_proj rows matched between the two models;
  heads     query heads, matched by their q_proj rows; kv_heads: KV heads, by their k_proj rows.
Every method copies q_proj, k_proj and gate_proj rows untouched (only o_proj and down_proj are refit),
so a unit both kept has the same rows in both models once the wider dtype's are rounded to the narrower
one (float32 -> bfloat16 rounds as from_pretrained(dtype=bfloat16) does).
--metrics: each model's `fang evaluate` JSON; reported: perplexity and the seven-task average of each, and
B against A paired (`fang.evaluation.report.compare_runs`: perplexity ratio, accuracy differences, 95%
intervals). --timings: each run's artifacts/timings.jsonl (two projects, or the file copied between
the runs: a rerun of the same stage replaces its entry); stages are matched by name and by their
arguments other than paths (a prune's --out differs between the runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fang.core.atomic import write_json  # noqa: E402
from fang.core.errors import FangError, require  # noqa: E402
from fang.model.shrink import KEPT_ATTR, WEIGHTS_FILE, read_structure  # noqa: E402

# the narrower of two dtypes: a float32 model's rows are rounded to it before rows are compared
_BITS = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}


class Weights:
    """The tensors of one pruned model directory, read lazily (memory-mapped safetensors)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self.structure = read_structure(path)["layers"]
        require((path / WEIGHTS_FILE).exists(), f"{path} has no {WEIGHTS_FILE}: not a pruned model directory")
        self._fh = safe_open(str(path / WEIGHTS_FILE), framework="pt")
        self.config = json.loads((path / "config.json").read_text())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._fh.get_tensor(name)
        except Exception:  # SafetensorError: a missing name
            raise FangError(f"{self.path}/{WEIGHTS_FILE} has no tensor {name}") from None

    @property
    def head_dim(self) -> int:
        c = self.config
        return int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])


def _rows_as_keys(w: torch.Tensor, width: int, dtype: torch.dtype) -> list[bytes]:
    """Each group of `width` consecutive rows of `w`, rounded to `dtype`, as bytes."""
    w = w.to(dtype).contiguous()
    require(w.shape[0] % width == 0, f"{w.shape[0]} rows do not split into units of {width}")
    return [w[i : i + width].view(torch.int16 if w.element_size() == 2 else torch.int32).numpy().tobytes()
            for i in range(0, w.shape[0], width)]


def _narrower(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    require(a == b or torch.float32 in (a, b),
            f"the models are in {a} and {b}: rows can only be compared when one of them is float32 or both agree")
    return min((a, b), key=lambda d: _BITS[d])


def _matched(wa: torch.Tensor, wb: torch.Tensor, width: int) -> int:
    """Units (groups of `width` rows) present in both weights, once rounded to the narrower dtype."""
    dtype = _narrower(wa.dtype, wb.dtype)
    return len(set(_rows_as_keys(wa, width, dtype)) & set(_rows_as_keys(wb, width, dtype)))


def compare_units(a: Weights, b: Weights) -> dict:
    """Per block: units kept by A, by B and by both (FFN neurons, query heads, KV heads), and a summary."""
    require(len(a.structure) == len(b.structure),
            f"{a.path} has {len(a.structure)} blocks, {b.path} {len(b.structure)}: not pruned from the same model")
    require(a.head_dim == b.head_dim, "the two models have different head sizes: not pruned from the same model")
    blocks = []
    for li, (sa, sb) in enumerate(zip(a.structure, b.structure)):
        entry: dict = {"layer": li}
        if KEPT_ATTR in sa and KEPT_ATTR in sb:
            ka, kb = set(sa[KEPT_ATTR]), set(sb[KEPT_ATTR])
            entry["ffn"] = {"a": len(ka), "b": len(kb), "both": len(ka & kb), "from": "kept_neurons"}
        else:
            name = f"model.layers.{li}.mlp.gate_proj.weight"
            both = _matched(a.get(name), b.get(name), 1)
            entry["ffn"] = {"a": int(sa["intermediate_size"]), "b": int(sb["intermediate_size"]), "both": both,
                            "from": "gate_proj rows"}
        for key, proj, count in (("heads", "q_proj", "n_heads"), ("kv_heads", "k_proj", "n_kv_heads")):
            name = f"model.layers.{li}.self_attn.{proj}.weight"
            entry[key] = {"a": int(sa[count]), "b": int(sb[count]),
                          "both": _matched(a.get(name), b.get(name), a.head_dim), "from": f"{proj} rows"}
        for key in ("ffn", "heads", "kv_heads"):
            u = entry[key]
            u["differ"] = u["a"] + u["b"] - 2 * u["both"]  # kept by one model only
        entry["identical"] = all(entry[k]["differ"] == 0 for k in ("ffn", "heads", "kv_heads"))
        blocks.append(entry)
    summary = {"blocks": len(blocks), "identical_blocks": sum(e["identical"] for e in blocks)}
    for key in ("ffn", "heads", "kv_heads"):
        kept_a = sum(e[key]["a"] for e in blocks)
        both = sum(e[key]["both"] for e in blocks)
        summary[key] = {"kept_a": kept_a, "kept_b": sum(e[key]["b"] for e in blocks), "both": both,
                        "differ": sum(e[key]["differ"] for e in blocks),
                        "agreement": round(both / kept_a, 6) if kept_a else None}
    return {"summary": summary, "blocks": blocks}


def compare_metrics(path_a: Path, path_b: Path) -> dict:
    """Perplexity and seven-task average of each, and B against A paired."""
    from fang.evaluation.report import PAPER_AVG, Run, average, compare_runs, paper_tasks_in, task_accuracy

    out: dict = {}
    runs = []
    for label, path in (("a", path_a), ("b", path_b)):
        require(path.exists(), f"--metrics {path} does not exist")
        m = json.loads(path.read_text())
        seven = paper_tasks_in(list(m.get("tasks", {})))
        avg, se = average([task_accuracy(m["tasks"][t]) for t in seven]) if seven else (None, None)
        out[label] = {"metrics": str(path), "ppl": m.get("ppl"), "eval_dtype": m.get("dtype"),
                      PAPER_AVG.lower(): avg, f"{PAPER_AVG.lower()}_se": se,
                      "tasks": {t: task_accuracy(e)[0] for t, e in m.get("tasks", {}).items()}}
        runs.append(Run(label, 0.0, m))
    if runs[0].metrics.get("ppl_windows") and runs[1].metrics.get("ppl_windows"):
        out["paired_b_vs_a"] = compare_runs(runs[0], runs[1])
    else:
        out["paired_b_vs_a"] = None  # metrics without per-window / per-question scores: nothing to pair
    return out


def _latest(path: Path) -> dict[tuple, dict]:
    """The timing entries of one timings.jsonl, keyed by stage and its non-path arguments."""
    require(path.exists(), f"--timings {path} does not exist")
    out = {}
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(e, dict) and "stage" in e:
            args = tuple(a for a in e.get("args") or () if "/" not in str(a))
            out[(e["stage"], args)] = e  # the file keeps one entry per (stage, args); the last wins
    return out


def compare_timings(path_a: Path, path_b: Path) -> list[dict]:
    ta, tb = _latest(path_a), _latest(path_b)
    rows = []
    for key in sorted(set(ta) & set(tb), key=lambda k: (k[0], [str(x) for x in k[1]])):
        a, b = ta[key], tb[key]
        rows.append({"stage": key[0], "args": list(key[1]), "seconds_a": a.get("seconds"), "seconds_b": b.get("seconds"),
                     "ratio_b_a": round(b["seconds"] / a["seconds"], 4) if a.get("seconds") and b.get("seconds") else None,
                     "peak_rss_mib_a": a.get("peak_rss_mib"), "peak_rss_mib_b": b.get("peak_rss_mib"),
                     "load_avg_a": a.get("load_avg"), "load_avg_b": b.get("load_avg"),
                     "threads_a": a.get("threads"), "threads_b": b.get("threads")})
    return rows


def _prune_report(model_dir: Path) -> dict | None:
    """The prune report beside a --out directory (DIR.prune.json), or artifacts/metrics/prune.json for
    artifacts/pruned; None when there is none."""
    for p in (model_dir.parent / f"{model_dir.name}.prune.json", model_dir.parent / "metrics" / "prune.json"):
        if p.exists():
            r = json.loads(p.read_text())
            return {"file": str(p), "method": r.get("method"), "compute_dtype": r.get("compute_dtype", "float32"),
                    "target_sparsity": r.get("target_sparsity"), "achieved_sparsity": r.get("achieved_sparsity")}
    return None


def compare(dir_a: Path, dir_b: Path, metrics: list[Path] | None = None, timings: list[Path] | None = None) -> dict:
    a, b = Weights(dir_a), Weights(dir_b)
    result = {"a": {"model": str(dir_a), "weights_dtype": str(a.get("model.embed_tokens.weight").dtype)[6:],
                    "prune": _prune_report(dir_a)},
              "b": {"model": str(dir_b), "weights_dtype": str(b.get("model.embed_tokens.weight").dtype)[6:],
                    "prune": _prune_report(dir_b)},
              "units": compare_units(a, b)}
    if metrics:
        result["metrics"] = compare_metrics(*metrics)
    if timings:
        result["timings"] = compare_timings(*timings)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="pruned model directory of the reference run (float32)")
    ap.add_argument("b", type=Path, help="pruned model directory of the other run (bfloat16)")
    ap.add_argument("--out", type=Path, required=True, help="the JSON to write")
    ap.add_argument("--metrics", type=Path, nargs=2, metavar=("A_JSON", "B_JSON"), help="fang evaluate JSONs")
    ap.add_argument("--timings", type=Path, nargs=2, metavar=("A_JSONL", "B_JSONL"), help="each run's timings.jsonl")
    args = ap.parse_args(argv)
    try:
        result = compare(args.a, args.b, args.metrics, args.timings)
    except FangError as exc:
        sys.exit(f"error: {exc}")
    write_json(args.out, result)
    s = result["units"]["summary"]
    print(f"{s['identical_blocks']} of {s['blocks']} blocks keep identical units; FFN neurons kept by one run only: "
          f"{s['ffn']['differ']} (agreement {s['ffn']['agreement']}), query heads: {s['heads']['differ']}, "
          f"KV heads: {s['kv_heads']['differ']} -> {args.out}")


if __name__ == "__main__":
    main()
