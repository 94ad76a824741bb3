"""allocate: per-block functional complexity (Eq. 8) and per-block sparsity for heads and FFN neurons."""

import csv

import torch

from fang import paths
from fang.allocate import ComplexityStats, allocate_sparsity
from fang.atomic import atomic_file, write_json
from fang.capture import open_capture
from fang.layerwise import batch_slices
from fang.params import PruneParams, load_block
from fang.progress import console, progress
from fang.store import open_store


def functional_complexities(cap) -> list[float]:
    """FC_l = 1 - mean cos(X_l, X_l+1) over calibration tokens, streamed chunk by chunk."""
    n_layers, n_tok = cap.attrs["n_layers"], cap["block_io"].shape[1]
    chunk = cap["block_io"].chunks[1]
    fc = []
    with progress() as bar:
        task = bar.add_task("functional complexity", total=n_layers)
        for li in range(n_layers):
            stats = ComplexityStats()
            for sl in batch_slices(n_tok, chunk):
                stats.add_batch(torch.from_numpy(cap["block_io"][li, sl]).float(),
                                torch.from_numpy(cap["block_io"][li + 1, sl]).float())
            fc.append(float(stats.value))
            bar.advance(task)
    return fc


def run(params_path: str = "params.yaml") -> None:
    p = load_block("allocate", path=params_path)
    target = load_block("prune", PruneParams, path=params_path).sparsity
    cap = open_capture(paths.CAPTURE)
    fc = functional_complexities(cap)
    scores = {"fc": fc, "uniform": fc}.get(p.mode)
    if p.mode == "taylor":
        scores = open_store(paths.TAYLOR, "taylor", "taylor")["block_sensitivity"][:].tolist()
    # every dense block has the same size, so the parameter-weighted mean is the plain mean
    sparsity = allocate_sparsity(p.mode, scores, target, n_blocks=len(fc), max_sparsity=p.max_sparsity)
    write_json(paths.ALLOCATE, {
        "mode": p.mode, "target_sparsity": target, "functional_complexity": fc, "scores": scores,
        "attn_sparsity": sparsity, "ffn_sparsity": sparsity,
        "mean_sparsity": sum(sparsity) / len(sparsity),
    })
    with atomic_file(paths.PLOTS / "block_sparsity.csv") as fh:
        w = csv.writer(fh)
        w.writerow(["layer", "functional_complexity", "sparsity"])
        w.writerows([li, round(f, 6), round(s, 6)] for li, (f, s) in enumerate(zip(fc, sparsity)))
    console.print(f"allocation ({p.mode}): block sparsity {min(sparsity):.3f}..{max(sparsity):.3f}, mean {sum(sparsity)/len(sparsity):.3f} -> {paths.ALLOCATE}")
