"""taylor: one forward+backward pass; cluster-neuron Taylor scores S (Eq. 5) per layer, and the cluster
centres at down_proj's input with their distance matrix (Eq. 6), measured in the same pass."""

import torch

from fang.analysis.capture import capture_residual, open_capture
from fang.analysis.cluster import center_distances
from fang.analysis.store import open_store, write_store
from fang.analysis.taylor import taylor_scores
from fang.core import paths
from fang.core.device import dtype_record, pick_device
from fang.core.errors import require
from fang.core.params import load_block
from fang.core.progress import console
from fang.core.outputs import take_lock
from fang.data.corpus import load_calibration
from fang.model.offload import load_for_block_passes


def run(params_path: str = "params.yaml", source: str | None = None, analysis: str | None = None) -> None:
    p = load_block("taylor", path=params_path)
    model_p = load_block("model", path=params_path)  # offload: where block weights wait; compute_dtype: what they run in
    art = paths.calibration_artifacts(source, analysis)
    take_lock(art.taylor)  # one writer at a time (fang.core.outputs)
    clusters = open_store(art.cluster, "cluster", "cluster")
    input_ids = load_calibration(source, analysis)
    token_clusters = torch.from_numpy(clusters["token_clusters"][:]).long()
    require(token_clusters.shape[1] == input_ids.numel(),
            f"{art.cluster} labels {token_clusters.shape[1]} tokens but the calibration set has {input_ids.numel()}: rerun cluster")
    device = pick_device()
    model, _, dtype = load_for_block_passes(paths.MODEL, device, model_p)
    k = clusters.attrs["k"]
    residual = capture_residual(open_capture(art.capture), input_ids, dtype)
    console.print("taylor: block inputs " + ("read from capture's residual stream" if residual is not None else
                  "recomputed (the capture has no residual stream in this compute dtype: capture.residual)"))
    res = taylor_scores(model, input_ids, token_clusters, k, p.batch_size, device, graph_blocks=p.graph_blocks,
                        residual=residual)
    # Eq. 6's distances between cluster centres at down_proj's input, for FANG's token weights
    res["center_distances"] = torch.stack([center_distances(c) for c in res["down_centers"]])
    write_store(art.taylor, "taylor", {name: t.numpy() for name, t in res.items()}, {"k": k, **dtype_record(dtype)})
    console.print(f"taylor scores [{res['scores'].shape[0]} layers x k={k} x {res['scores'].shape[2]} neurons] -> {art.taylor}")
