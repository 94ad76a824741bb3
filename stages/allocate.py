"""allocate: per-block functional complexity (Eq. 8) and per-block sparsity for heads and FFN neurons."""

import csv
from concurrent.futures import ThreadPoolExecutor

import torch

from fang import paths
from fang.allocate import ComplexityStats, allocate_sparsity
from fang.atomic import atomic_file, write_json
from fang.capture import open_capture
from fang.layerwise import batch_slices
from fang.params import load_block
from fang.progress import console, progress
from fang.store import open_store


def functional_complexities(cap) -> list[float]:
    """FC_l = 1 - mean cos(X_l, X_l+1) over calibration tokens, one block's hidden states at a time.

    Each layer of block_io is read and converted to float64 once (block l's output is block l+1's
    input), and the next layer is read in a background thread while this one's cosines are computed.
    """
    n_layers, n_tok = cap.attrs["n_layers"], cap["block_io"].shape[1]
    chunk = cap["block_io"].chunks[1]

    def load(li: int) -> torch.Tensor:
        return torch.from_numpy(cap["block_io"][li]).double()

    fc = []
    with ThreadPoolExecutor(max_workers=1) as reader, progress() as bar:
        task = bar.add_task("functional complexity", total=n_layers)
        block_in, pending = load(0), reader.submit(load, 1)
        for li in range(n_layers):
            block_out = pending.result()
            if li + 2 <= n_layers:
                pending = reader.submit(load, li + 2)
            stats = ComplexityStats()
            for sl in batch_slices(n_tok, chunk):  # the chunks fix the summation order: FC is bit-stable
                stats.add_batch(block_in[sl], block_out[sl])
            fc.append(float(stats.value))
            block_in = block_out
            bar.advance(task)
    return fc


def run(params_path: str = "params.yaml", source: str | None = None) -> None:
    p = load_block("allocate", path=params_path)
    # the targets only fill block_sparsity.json (a view for people and plots): the sweep's, or the study's
    targets = load_block("sweep" if source is None else "bias", path=params_path).sparsities
    art = paths.calibration_artifacts(source)
    cap = open_capture(art.capture)
    fc = functional_complexities(cap)
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
