"""`fang bench --parts profile`: cProfile of capture and taylor on the first calibration sequences, as their
stages run them (where a missed target's time goes)."""

from __future__ import annotations

from ...core import paths
from ...core.device import resolve_compute_dtype
from ...core.params import load_block
from ...model.offload import load_dense_offloaded
from .floor import profile_call, subsample


def profile_stages(params_path: str, device, n_seqs: int, offload: str = "none") -> dict:
    """cProfile of capture and taylor on the first `n_seqs` calibration sequences (where a missed target's time goes)."""
    import tempfile

    import torch

    from ...analysis.capture import capture_features
    from ...analysis.store import open_store
    from ...analysis.taylor import taylor_scores
    from ...data.corpus import load_calibration

    cap = load_block("capture", path=params_path)
    tay = load_block("taylor", path=params_path)
    ids = subsample(load_calibration(), max_seqs=n_seqs)
    clusters = open_store(paths.CLUSTER, "cluster", "cluster")
    labels = torch.from_numpy(clusters["token_clusters"][:, : ids.numel()]).long()
    dtype = resolve_compute_dtype(load_block("model", path=params_path).compute_dtype, device)
    model, _ = load_dense_offloaded(paths.MODEL, device, dtype, offload=offload)
    runs = {}
    with tempfile.TemporaryDirectory(dir=paths.ARTIFACTS) as tmp:
        pca_dim = load_block("cluster", path=params_path).pca_dim  # as the stage runs it: PCA, slim store
        runs["capture"] = profile_call(lambda: capture_features(model, ids, f"{tmp}/capture.zarr", cap.batch_size,
                                                                cap.dtype, device, pca_dim=pca_dim, keep=cap.keep))
    runs["taylor"] = profile_call(lambda: taylor_scores(model, ids, labels, clusters.attrs["k"], tay.batch_size, device))
    return {"sequences": int(ids.shape[0]), "runs": runs}
