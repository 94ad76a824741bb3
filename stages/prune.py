"""prune: structured pruning of the dense model (heads + FFN neurons), saved really shrunk."""

import contextlib
import dataclasses
import tempfile
from pathlib import Path

from fang.analysis.capture import open_capture
from fang.core import paths
from fang.core.atomic import write_json
from fang.core.choices import parse_recipe
from fang.core.device import pick_device
from fang.core.errors import FangError
from fang.core.outputs import guard_output
from fang.core.params import load_block
from fang.core.progress import console
from fang.core.registry import method_spec
from fang.methods.driver import method_class, prune_model
from fang.methods.units import PruneOptions
from fang.model.offload import load_for_block_passes
from fang.model.shrink import save_pruned


# The analysis artifacts the main pipeline (dvc.yaml) builds and its prune stage lists as deps. A method
# reading others (ica_fn: ica.zarr, gprune: gprune.zarr, built by the studies' stages) is pruned in a
# study, whose cells depend on a manifest of everything their method reads (`fang method-inputs`).
MAIN_JOB_ARTIFACTS = ("cluster", "taylor", "groups", "allocate")


def run(params_path: str = "params.yaml", method: str | None = None, sparsity: float | None = None,
        out: str | None = None, source: str | None = None, analysis: str | None = None) -> None:
    """Prune with `prune.method`/`prune.sparsity`, or the given overrides (used by the sweeps), from the
    main calibration's artifacts or those of one bias-study `source`. `method` may name a variant,
    `method+allocation+compensation` (e.g. "obc+fc") followed by prune settings of its own
    (a recipe-study candidate, "o_fang+layer,tau=3"); parts not named come from params.yaml."""
    p = load_block("prune", path=params_path)
    model_p = load_block("model", path=params_path)  # offload: where block weights wait; compute_dtype: what they run in
    recipe = parse_recipe(p.method if method is None else method, p.allocation, p.compensation)
    variant = recipe.variant
    method = variant.method
    sparsity = p.sparsity if sparsity is None else sparsity
    # a recipe's own settings ("o_fang+layer,tau=3") replace the params block's values
    p = dataclasses.replace(recipe.apply(p), sparsity=sparsity)
    p.validate()  # the sweeps' --method/--sparsity overrides get the params block's checks, before any loading
    extra = [a for a in method_spec(method).artifacts if a not in MAIN_JOB_ARTIFACTS]
    if not out and analysis is not None:
        raise FangError("--analysis prunes from a recipe-study analysis variant: give --out DIR too, so the main "
                        "pipeline's artifacts/pruned is left to its own stage")
    if not out and source is None and extra:
        raise FangError(
            f"prune.method={method} reads {', '.join(str(getattr(paths.MAIN, a)) for a in extra)}, which the main "
            "pipeline does not build (dvc.yaml's prune stage could not see it change): prune it in the sweep (add it "
            "to sweep.methods, `dvc repro studies/sweep/dvc.yaml`) or by hand with --out DIR"
        )
    out_dir = guard_output(paths.PRUNED if out is None else out, "pruned_model", "--out", [paths.MODEL])
    report_file = guard_output(out_dir.parent / f"{out_dir.name}.prune.json" if out else paths.METRICS / "prune.json",
                               "prune_report", "--out's report")
    art = paths.calibration_artifacts(source, analysis)
    capture = open_capture(art.capture)
    options = PruneOptions.from_params(p, variant)
    inputs = method_class(method).load_inputs(art, params_path, options=options)
    device = pick_device()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # model.offload=disk: each pruned block is written to this directory as it leaves the device, not kept on
    # the host, and save_pruned reads them back one at a time (beside out_dir: the same disk, not a RAM /tmp)
    spill_dir = (tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.blocks-")
                 if model_p.offload == "disk" else contextlib.nullcontext())
    with spill_dir as spill:  # the pruned model is saved in the dtype it was pruned in (model.compute_dtype, resolved)
        model, tokenizer, _ = load_for_block_passes(paths.MODEL, device, model_p, spill=spill)
        report = prune_model(model, capture, method, sparsity, p.gqa, p.batch_size, device,
                             options=options, inputs=inputs, art=art)
        save_pruned(model, tokenizer, out_dir)  # a streamed model: in shards, one block at a time
    write_json(report_file, report.as_dict())
    console.print(
        f"{recipe.name}: target sparsity {sparsity:.3f}, achieved {report.achieved_sparsity:.3f} "
        f"({report.pruned_block_params:,} of {report.dense_block_params:,} block parameters kept) -> {out_dir}"
    )
    gap = report.achieved_sparsity - sparsity
    unit = report.unit_fraction
    if abs(gap) > unit:
        console.print(f"[yellow]warning: {method} achieved sparsity {report.achieved_sparsity:.3f}, "
                      f"{abs(gap):.3f} {'below' if gap < 0 else 'above'} the target {sparsity:.3f} (more than one "
                      f"pruning unit, {unit:.4f}): the method could not remove that much; see {report_file}[/yellow]")

