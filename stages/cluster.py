"""cluster: per layer, PCA of the FFN-input tokens and KMeans into k context clusters."""

import faiss
import numpy as np
import torch

from fang import paths
from fang.atomic import write_json
from fang.capture import open_capture
from fang.cluster import CenterStats, center_distances, kmeans, kmeans_backend, pca_fit, pca_project
from fang.device import pick_device
from fang.errors import require
from fang.layerwise import batch_slices
from fang.params import load_block
from fang.progress import console, progress
from fang.store import write_store


def run(params_path: str = "params.yaml", source: str | None = None) -> None:
    p = load_block("cluster", path=params_path)
    art = paths.calibration_artifacts(source)
    cap = open_capture(art.capture)
    n_layers, d, n_ffn = cap.attrs["n_layers"], cap.attrs["hidden_size"], cap.attrs["intermediate_size"]
    n_tok = cap["ffn_in"].shape[1]
    require(p.k <= n_tok, f"cluster.k={p.k} is larger than the number of calibration tokens ({n_tok})")
    require(p.pca_dim <= d, f"cluster.pca_dim={p.pca_dim} is above the model's hidden size ({d})")
    device = pick_device()
    backend = kmeans_backend(faiss)  # decided once, recorded in the metrics
    out = {
        "pca_mean": np.zeros((n_layers, d), np.float32),
        "pca_components": np.zeros((n_layers, p.pca_dim, d), np.float32),
        "centroids": np.zeros((n_layers, p.k, p.pca_dim), np.float32),
        "token_clusters": np.zeros((n_layers, n_tok), np.int32),
        "cluster_sizes": np.zeros((n_layers, p.k), np.int64),
        "inertia": np.zeros(n_layers, np.float64),
        "down_centers": np.zeros((n_layers, p.k, n_ffn), np.float32),
        "center_distances": np.zeros((n_layers, p.k, p.k), np.float32),
    }
    chunk = cap["down_in"].chunks[1]
    with progress() as bar:
        task = bar.add_task("cluster", total=n_layers)
        for li in range(n_layers):
            x = torch.from_numpy(cap["ffn_in"][li]).to(device).float()
            mean, comps = pca_fit(x, p.pca_dim)
            centroids, assign, inertia = kmeans(pca_project(x, mean, comps), p.k, p.niter, p.seed, backend=backend)
            del x
            assign = assign.cpu()
            # cluster centres at the down_proj input, streamed chunk by chunk (Eq. 6's distances)
            centers = CenterStats(p.k, n_ffn, device)
            for sl in batch_slices(n_tok, chunk):
                centers.add_batch(torch.from_numpy(cap["down_in"][li, sl]).to(device), assign[sl])
            out["pca_mean"][li], out["pca_components"][li] = mean.cpu().numpy(), comps.cpu().numpy()
            out["centroids"][li], out["token_clusters"][li] = centroids.cpu().numpy(), assign.numpy()
            out["cluster_sizes"][li] = np.bincount(assign.numpy(), minlength=p.k)
            out["inertia"][li] = inertia
            out["down_centers"][li] = centers.centers.cpu().numpy()
            out["center_distances"][li] = center_distances(centers.centers).cpu().numpy()
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
