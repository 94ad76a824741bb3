"""cluster: per layer, KMeans of the PCA-projected FFN-input tokens into k context clusters.

The PCA itself is fitted by capture (the store keeps the projections, not the full inputs); the
cluster centres at down_proj's input come from taylor, which reruns the blocks with the clusters known.
"""

import faiss
import numpy as np
import torch

from fang import paths
from fang.atomic import write_json
from fang.capture import open_capture, require_array
from fang.cluster import kmeans, kmeans_backend
from fang.device import pick_device
from fang.errors import require
from fang.memory import check_fits
from fang.params import load_block
from fang.progress import console, progress
from fang.store import write_store


def cluster_bytes(n_layers: int, n_tok: int, d: int, n_ffn: int, k: int, pca_dim: int) -> int:
    """Peak bytes of the stage, roughly: the output arrays plus one layer's working set."""
    outputs = 4 * n_layers * (d + pca_dim * d + k * pca_dim + n_tok + 2 * k + k * n_ffn + k * k)
    layer = n_tok * d * 4 + n_tok * pca_dim * (4 + 4 + 8)  # features, projection, KMeans copies
    layer += 8 * n_tok * (3 + int(np.log(max(k, 2))))  # k-means++ candidate distances
    layer += 4 * 32768 * k + 256 * 2**20  # faiss's distance blocks, the exact assignment's chunk
    layer += 8 * k * n_ffn * 3  # centre sums and a row of centre differences
    return outputs + layer


def run(params_path: str = "params.yaml", source: str | None = None) -> None:
    p = load_block("cluster", path=params_path)
    art = paths.calibration_artifacts(source)
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
        "centroids": np.zeros((n_layers, p.k, p.pca_dim), np.float32),
        "token_clusters": np.zeros((n_layers, n_tok), np.int32),
        "cluster_sizes": np.zeros((n_layers, p.k), np.int64),
        "inertia": np.zeros(n_layers, np.float64),
    }
    with progress() as bar:
        task = bar.add_task("cluster", total=n_layers)
        for li in range(n_layers):
            centroids, assign, inertia = kmeans(torch.from_numpy(proj[li]).to(device), p.k, p.niter, p.seed,
                                                backend=backend)
            assign = assign.cpu()
            out["centroids"][li], out["token_clusters"][li] = centroids.cpu().numpy(), assign.numpy()
            out["cluster_sizes"][li] = np.bincount(assign.numpy(), minlength=p.k)
            out["inertia"][li] = inertia
            bar.advance(task)
    write_store(art.cluster, "cluster", out, {"k": p.k, "pca_dim": p.pca_dim, "seed": p.seed, "n_layers": n_layers})
    sizes = out["cluster_sizes"]
    write_json(art.metrics / "cluster.json", {
        "k": p.k, "tokens": n_tok, "kmeans_backend": backend,
        "smallest_cluster_fraction": float(sizes.min() / n_tok),
        "largest_cluster_fraction": float(sizes.max() / n_tok),
        "cluster_sizes": sizes.tolist(), "inertia": out["inertia"].tolist(),
    })
    console.print(f"clustered {n_tok:,} tokens x {n_layers} layers into k={p.k} -> {art.cluster}")
