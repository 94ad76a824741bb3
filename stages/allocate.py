"""allocate: per-block functional complexity (Eq. 8) and per-block sparsity for heads and FFN neurons."""

import csv

from fang import paths
from fang.allocate import allocate_sparsity
from fang.atomic import atomic_file, write_json
from fang.capture import open_capture, require_array
from fang.params import load_block
from fang.progress import console
from fang.store import open_store


def functional_complexities(cap, path) -> list[float]:
    """FC_l = 1 - mean cos(X_l, X_l+1) over calibration tokens (Eq. 8), accumulated by capture."""
    return [float(v) for v in require_array(cap, "fc", path)[:]]


def run(params_path: str = "params.yaml", source: str | None = None) -> None:
    p = load_block("allocate", path=params_path)
    # the targets only fill block_sparsity.json (a view for people and plots): the sweep's, or the study's
    targets = load_block("sweep" if source is None else "bias", path=params_path).sparsities
    art = paths.calibration_artifacts(source)
    cap = open_capture(art.capture)
    fc = functional_complexities(cap, art.capture)
    # both block scores are kept, so any method can use either (prune.allocation: fc | taylor)
    taylor = open_store(art.taylor, "taylor", "taylor")["block_sensitivity"][:].tolist()
    scores = taylor if p.mode == "taylor" else fc
    # allocate.json holds only what does not depend on the target sparsity, so pruning stages that
    # read it are not rerun when a sparsity is added to or changed in the sweep
    write_json(art.allocate, {"mode": p.mode, "max_sparsity": p.max_sparsity, "functional_complexity": fc,
                              "taylor_sensitivity": taylor, "scores": scores})
    # every dense block has the same size, so the parameter-weighted mean is the plain mean
    by_target = {str(t): allocate_sparsity(p.mode, scores, t, n_blocks=len(fc), max_sparsity=p.max_sparsity) for t in targets}
    write_json(art.block_sparsity, {
        "mode": p.mode,
        "note": "per-block sparsity for heads and FFN neurons (the same value), for each sweep target",
        "by_target": {t: {"attn_sparsity": v, "ffn_sparsity": v, "mean_sparsity": sum(v) / len(v)} for t, v in by_target.items()},
    })
    with atomic_file(art.plots / "block_sparsity.csv") as fh:
        w = csv.writer(fh)
        w.writerow(["layer", "functional_complexity", *[f"sparsity_at_{t}" for t in by_target]])
        w.writerows([li, round(f, 6), *[round(v[li], 6) for v in by_target.values()]] for li, f in enumerate(fc))
    ranges = ", ".join(f"{t}: {min(v):.3f}..{max(v):.3f}" for t, v in by_target.items())
    console.print(f"allocation ({p.mode}): block sparsity per target {ranges} -> {art.allocate}, {art.block_sparsity}")
