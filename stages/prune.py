"""prune: structured pruning of the dense model (heads + FFN neurons), saved really shrunk."""

from pathlib import Path

from fang import paths
from fang.allocate import allocate_sparsity
from fang.atomic import read_json, write_json
from fang.capture import open_capture
from fang.device import pick_device
from fang.fang_prune import FangInputs
from fang.modeling import load_dense
from fang.params import load_block
from fang.progress import console
from fang.prune import FANG_BASE, PruneOptions, prune_model
from fang.shrink import save_pruned
from fang.store import open_store


def fang_inputs(sparsity: float, source: str | None = None) -> FangInputs:
    """The analysis artifacts FANG prunes with; block sparsity follows the allocation scores for `sparsity`."""
    art = paths.calibration_artifacts(source)
    clusters = open_store(art.cluster, "cluster", "cluster")
    taylor = open_store(art.taylor, "taylor", "taylor")
    groups = open_store(art.groups, "groups", "group")
    alloc = read_json(art.allocate)
    per_block = allocate_sparsity(alloc["mode"], alloc["scores"], sparsity, n_blocks=len(alloc["functional_complexity"]),
                                  max_sparsity=alloc["max_sparsity"])
    return FangInputs(
        pca_mean=clusters["pca_mean"][:],
        pca_components=clusters["pca_components"][:],
        centroids=clusters["centroids"][:],
        center_distances=taylor["center_distances"][:],
        neuron_groups=groups["neuron_groups"][:],
        sparsity=per_block,
    )


def run(params_path: str = "params.yaml", method: str | None = None, sparsity: float | None = None,
        out: str | None = None, source: str | None = None) -> None:
    """Prune with `prune.method`/`prune.sparsity`, or the given overrides (used by the sweeps), from the
    main calibration's artifacts or those of one bias-study `source`."""
    p = load_block("prune", path=params_path)
    method = method or p.method
    sparsity = p.sparsity if sparsity is None else sparsity
    out_dir = Path(out) if out else paths.PRUNED
    report_file = out_dir.parent / f"{out_dir.name}.prune.json" if out else paths.METRICS / "prune.json"
    capture = open_capture(paths.calibration_artifacts(source).capture)
    inputs = fang_inputs(sparsity, source) if method in FANG_BASE else None
    device = pick_device()
    model, tokenizer = load_dense(paths.MODEL, device)
    report = prune_model(model, capture, method, sparsity, p.gqa, p.batch_size, device,
                         options=PruneOptions.from_params(p), fang_inputs=inputs)
    save_pruned(model, tokenizer, out_dir)
    write_json(report_file, report.as_dict())
    console.print(
        f"{method}: target sparsity {sparsity:.3f}, achieved {report.achieved_sparsity:.3f} "
        f"({report.pruned_block_params:,} of {report.dense_block_params:,} block parameters kept) -> {out_dir}"
    )
