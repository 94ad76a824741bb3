"""cluster: per layer, KMeans of the PCA-projected FFN-input tokens into k context clusters.

The PCA itself is fitted by capture (the store keeps the projections, not the full inputs); the
cluster centres at down_proj's input come from taylor, which reruns the blocks with the clusters known.
"""

import faiss
import numpy as np

from fang.analysis.capture import open_capture, require_array
from fang.analysis.cluster import cluster_bytes, cluster_layers, kmeans_backend
from fang.analysis.store import write_store
from fang.core import paths
from fang.core.atomic import write_json
from fang.core.device import pick_device
from fang.core.errors import require
from fang.core.memory import check_fits
from fang.core.params import load_block
from fang.core.progress import console
from fang.core.outputs import take_lock


def run(params_path: str = "params.yaml", source: str | None = None, analysis: str | None = None) -> None:
    p = load_block("cluster", path=params_path, analysis=analysis)
    art = paths.calibration_artifacts(source, analysis)
    take_lock(art.cluster)  # one writer at a time (fang.core.outputs)
    cap = open_capture(art.capture)
    n_layers, d = cap.attrs["n_layers"], cap.attrs["hidden_size"]
    n_tok = cap.attrs["n_samples"] * cap.attrs["seq_len"]
    require(p.k <= n_tok, f"cluster.k={p.k} is larger than the number of calibration tokens ({n_tok})")
    require(p.pca_dim <= d, f"cluster.pca_dim={p.pca_dim} is above the model's hidden size ({d})")
    n_ffn = cap.attrs["intermediate_size"]
    check_fits(cluster_bytes(n_layers, n_tok, d, n_ffn, p.k, p.pca_dim), "the cluster stage's arrays", f"cluster.k={p.k}")
    # the PCA is fitted while capturing (the store keeps only the projected MLP inputs)
    stored_dim = cap.attrs.get("pca_dim")
    require(stored_dim == p.pca_dim,
            f"{art.capture} holds a PCA of {stored_dim} components but cluster.pca_dim={p.pca_dim}: rerun capture")
    proj = require_array(cap, "ffn_proj", art.capture)
    device = pick_device()
    backend = kmeans_backend(faiss)  # decided once, recorded in the metrics
    out = {
        "pca_mean": np.asarray(cap["pca_mean"][:], np.float32),
        "pca_components": np.asarray(cap["pca_components"][:], np.float32),
        **cluster_layers(proj, n_layers, p.k, p.niter, p.seed, device, backend),
    }
    write_store(art.cluster, "cluster", out, {"k": p.k, "pca_dim": p.pca_dim, "seed": p.seed, "n_layers": n_layers})
    sizes = out["cluster_sizes"]
    write_json(art.metrics / "cluster.json", {
        "k": p.k, "tokens": n_tok, "kmeans_backend": backend,
        "smallest_cluster_fraction": float(sizes.min() / n_tok),
        "largest_cluster_fraction": float(sizes.max() / n_tok),
        "cluster_sizes": sizes.tolist(), "inertia": out["inertia"].tolist(),
    })
    console.print(f"clustered {n_tok:,} tokens x {n_layers} layers into k={p.k} -> {art.cluster}")
