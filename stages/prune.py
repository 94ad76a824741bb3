"""prune: structured pruning of the dense model (heads + FFN neurons), saved really shrunk."""

from fang import paths
from fang.atomic import write_json
from fang.capture import open_capture
from fang.device import pick_device
from fang.modeling import load_dense
from fang.params import load_block
from fang.progress import console
from fang.prune import prune_model
from fang.shrink import save_pruned


def run(params_path: str = "params.yaml") -> None:
    p = load_block("prune", path=params_path)
    capture = open_capture(paths.CAPTURE)
    device = pick_device()
    model, tokenizer = load_dense(paths.MODEL, device)
    report = prune_model(model, capture, p.method, p.sparsity, p.gqa, p.batch_size, device)
    save_pruned(model, tokenizer, paths.PRUNED)
    write_json(paths.METRICS / "prune.json", report.as_dict())
    console.print(
        f"{p.method}: target sparsity {p.sparsity:.3f}, achieved {report.achieved_sparsity:.3f} "
        f"({report.pruned_block_params:,} of {report.dense_block_params:,} block parameters kept) -> {paths.PRUNED}"
    )
