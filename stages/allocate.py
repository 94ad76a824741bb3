"""allocate: per-block functional complexity (Eq. 8) and per-block sparsity for heads and FFN neurons."""

from fang.analysis.allocate import write_allocation
from fang.analysis.capture import functional_complexities, open_capture
from fang.analysis.store import open_store
from fang.core import paths
from fang.core.params import load_block
from fang.core.progress import console
from fang.core.outputs import take_lock


def run(params_path: str = "params.yaml", source: str | None = None, analysis: str | None = None) -> None:
    p = load_block("allocate", path=params_path)
    # the targets only fill block_sparsity.json (a view for people and plots): the sweep's, or the study's
    targets = load_block("sweep" if source is None else "bias", path=params_path).sparsities
    art = paths.calibration_artifacts(source, analysis)
    take_lock(art.allocate)  # one writer at a time (fang.core.outputs)
    fc = functional_complexities(open_capture(art.capture), art.capture)
    taylor = open_store(art.taylor, "taylor", "taylor")["block_sensitivity"][:].tolist()
    by_target = write_allocation(art, p.mode, p.max_sparsity, fc, taylor, targets)
    ranges = ", ".join(f"{t}: {min(v):.3f}..{max(v):.3f}" for t, v in by_target.items())
    console.print(f"allocation ({p.mode}): block sparsity per target {ranges} -> {art.allocate}, {art.block_sparsity}")
