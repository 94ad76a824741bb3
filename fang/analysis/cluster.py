"""Context clustering (paper: "Functional Grouping of Neurons Based on Context Clustering").

Tokens entering an FFN are reduced with PCA and split into k clusters with KMeans; the clusters
are the "context types" neuron groups specialise in. Cluster centres measured at the input of
W_down give the distance matrix D and the relevance weights alpha of Eq. 6.

All functions are plain tensor functions; the stage wrapper handles I/O.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import Tensor

from ..core.errors import require
from ..core.progress import progress

RELEVANCE_MODES = ("ours", "uniform", "reverse", "only_matched")

# Token-to-centroid distances are computed for a chunk of rows at a time: at most this many rows,
# and at most _ASSIGN_BYTES for the [rows, k, dim] float64 temporary (a large k shrinks the chunk).
_ASSIGN_CHUNK = 8192
_ASSIGN_BYTES = 256 * 2**20


def _as_matrix(x: Tensor | np.ndarray, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    require(isinstance(x, Tensor), f"{name} must be a tensor or numpy array, got {type(x).__name__}")
    require(x.dim() == 2, f"{name} must be 2-D [tokens, features], got shape {tuple(x.shape)}")
    require(x.shape[0] > 0 and x.shape[1] > 0, f"{name} is empty: shape {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------------------------------- PCA


def pca_fit(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Exact PCA of the rows of `x` [T, d]: returns (mean [d], components [dim, d]), float32 (see `pca_fit_project`)."""
    mean, comps, _ = _pca(x, dim, project=False)
    return mean, comps


def pca_fit_project(x: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """`pca_fit` and `pca_project` of the same rows in one pass: (mean, components, projections [T, dim]).

    The centred rows of the fit are the ones the projection needs, so they are computed once; the result
    equals `pca_project(x, *pca_fit(x, dim))` bit for bit.
    """
    return _pca(x, dim, project=True)


def _pca(x: Tensor, dim: int, project: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Exact PCA of the rows of `x` [T, d]: (mean [d], components [dim, d], projections or None), float32.

    Components are the top-`dim` eigenvectors of the d x d covariance, ordered by decreasing
    variance. The covariance is accumulated in float32 (features arrive as fp16); the
    eigendecomposition runs in float64 because it is only d x d and float32 eigh loses the
    orthogonality of close eigenvalues. Each component's sign is fixed so its largest-magnitude
    entry is positive: eigh's signs are arbitrary, and a flipped axis would change nothing
    mathematically but would make stored artifacts differ between runs/devices.
    """
    x = _as_matrix(x, "PCA input")
    t, d = x.shape
    require(dim > 0, f"pca_dim={dim} must be positive")
    require(dim <= d, f"pca_dim={dim} exceeds the feature dimension d={d}")
    require(dim <= t, f"pca_dim={dim} exceeds the number of tokens T={t}: too few tokens for that many components")
    xf = x.float()
    mean = xf.mean(dim=0)
    # Centre before the product: x^T x - T mean mean^T would cancel catastrophically in float32.
    xc = xf - mean
    cov = (xc.T @ xc) / max(t - 1, 1)
    evals, evecs = torch.linalg.eigh(cov.double())  # ascending order
    comps = evecs[:, -dim:].flip(-1).T.contiguous()  # [dim, d], largest variance first
    pivot = comps.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(comps.gather(1, pivot))
    signs[signs == 0] = 1.0
    comps = (comps * signs).float()
    return mean, comps, (xc @ comps.T if project else None)


def pca_project(x: Tensor, mean: Tensor, components: Tensor) -> Tensor:
    """Project rows of `x` [T, d] onto the stored components: [T, dim] float32."""
    x = _as_matrix(x, "PCA input")
    require(
        x.shape[1] == mean.shape[0] == components.shape[1],
        f"PCA shape mismatch: x has d={x.shape[1]}, mean {tuple(mean.shape)}, components {tuple(components.shape)}",
    )
    mean = mean.to(device=x.device, dtype=torch.float32)
    components = components.to(device=x.device, dtype=torch.float32)
    return (x.float() - mean) @ components.T


# -------------------------------------------------------------------------------------- KMeans


def _nearest(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Exact nearest centroid per row: (index LongTensor [T], squared distance float64 [T]).

    Distances are explicit sums of squared differences in float64 rather than the
    |x|^2 - 2 x.c + |c|^2 expansion, so near-ties are resolved the same way every time and
    `assign_clusters` reproduces `kmeans`'s labels bit for bit (both call this function).
    Ties go to the lowest centroid index (torch.min returns the first minimum).
    """
    c = centroids.to(device=x.device, dtype=torch.float64)
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    rows = max(1, min(_ASSIGN_CHUNK, _ASSIGN_BYTES // (8 * c.shape[0] * max(c.shape[1], 1))))
    for start in range(0, x.shape[0], rows):
        xb = x[start : start + rows].to(torch.float64)
        d2 = ((xb[:, None, :] - c[None, :, :]) ** 2).sum(dim=-1)
        best, arg = d2.min(dim=1)
        idx[start : start + xb.shape[0]] = arg
        dist[start : start + xb.shape[0]] = best
    return idx, dist


GPU_INSTALL_HINT = 'pip install -e ".[gpu]" (docs/usage.md#gpu)'


def kmeans_backend(faiss, cuda_available: bool | None = None) -> str:
    """Where faiss's k-means runs: "gpu" when CUDA is present (and not overridden by FANG_DEVICE)
    and this faiss build can reach a GPU, "cpu" otherwise.

    A CUDA machine with the CPU-only faiss build falls back to CPU with a warning naming the
    install step, since the results are the same either way (see `kmeans`) and only time differs.
    """
    forced = os.environ.get("FANG_DEVICE", "")
    if forced and not forced.startswith("cuda"):
        return "cpu"
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        return "cpu"
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    if get_num_gpus is not None and get_num_gpus() > 0:
        return "gpu"
    warnings.warn(f"CUDA is available but the installed faiss is a CPU build: k-means runs on CPU; {GPU_INSTALL_HINT}",
                  stacklevel=2)
    return "cpu"


def kmeans_plusplus(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, with 2 + log k local trials per
    centre as in scikit-learn): [k, dim] float32 initial centroids drawn from the rows of x.

    faiss's own initialisation picks k random tokens; with a few well-separated context types
    that often puts two seeds in one cluster and Lloyd iterations cannot recover (a 4-blob toy
    set fails for most seeds). The official FANG code used scikit-learn's KMeans, whose default
    is this seeding, so it also keeps us closer to the reference behaviour.
    """
    rng = np.random.default_rng(seed)
    t = x.shape[0]
    xd = x.astype(np.float64)
    trials = 2 + int(np.log(k))
    centers = np.empty((k, x.shape[1]), dtype=np.float64)
    sq = (xd**2).sum(axis=1)

    def sqdist(points: np.ndarray) -> np.ndarray:  # [p, T]; expansion keeps memory at p x T
        return np.maximum(sq[None, :] - 2.0 * points @ xd.T + (points**2).sum(axis=1)[:, None], 0.0)

    centers[0] = xd[rng.integers(t)]
    closest = sqdist(centers[:1])[0]
    for c in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than clusters: any token will do
            cand = rng.integers(t, size=trials)
        else:
            cand = np.searchsorted(np.cumsum(closest), rng.random(trials) * total)
            cand = np.minimum(cand, t - 1)
        pot = np.minimum(closest[None, :], sqdist(xd[cand]))
        best = int(pot.sum(axis=1).argmin())
        centers[c] = xd[cand[best]]
        closest = pot[best]
    return centers.astype(np.float32)


def kmeans(
    x: Tensor | np.ndarray, k: int, niter: int = 25, seed: int = 0, init: str = "kmeans++", backend: str | None = None
) -> tuple[Tensor, Tensor, float]:
    """KMeans of the rows of `x` [T, dim] with faiss: (centroids [k, dim] f32, assignment [T] long, inertia).

    - Initialisation: `kmeans_plusplus` (default) or "random" (faiss's k random tokens).
    - Every token is used for training: faiss by default subsamples to 256 points per centroid,
      which for k=7 would fit on only 1792 of ~65k calibration tokens.
    - Seeded: the initial centroids and faiss's re-seeding of empty clusters derive from `seed`.
      On CPU the result is identical for a given seed, also across OpenMP thread counts
      (faiss's centroid update partitions work by centroid and sums points in order; see
      tests/test_cluster.py).
    - `backend`: "cpu", "gpu" or None (`kmeans_backend` decides). On the GPU, faiss computes
      the training assignments in float32 on the device; the seeding, the centroid update and
      the final assignment are the same code as on CPU, so a GPU run equals the CPU run up to
      float32 rounding: centroids agree to 1e-4 (relative to the data's scale) and labels may
      differ only for tokens equidistant to two centroids within that rounding (see
      tests/test_cluster.py::test_kmeans_gpu_matches_cpu, run where a GPU is present).
    - The final assignment is an exact nearest-centroid search (`_nearest`), not faiss's last
      training assignment, so it matches the returned centroids and `assign_clusters`.
    - Inertia is the float64 sum of squared distances to the assigned centroids.
    Returned tensors live on x's device (CPU for numpy input).
    """
    import faiss

    device = x.device if isinstance(x, Tensor) else torch.device("cpu")
    xt = _as_matrix(x, "KMeans input")
    t, dim = xt.shape
    require(k >= 1, f"k={k} must be positive")
    require(k <= t, f"k={k} clusters but only {t} tokens: need at least one token per cluster")
    require(niter > 0, f"niter={niter} must be positive")
    require(init in ("kmeans++", "random"), f"unknown KMeans init {init!r}: use 'kmeans++' or 'random'")
    require(backend in (None, "cpu", "gpu"), f"unknown k-means backend {backend!r}: use 'cpu', 'gpu' or None (auto)")
    if backend is None:
        backend = kmeans_backend(faiss)
    require(backend == "cpu" or getattr(faiss, "get_num_gpus", lambda: 0)() > 0,
            f"k-means backend 'gpu' asked for but faiss sees no GPU; {GPU_INSTALL_HINT}")
    data = np.ascontiguousarray(xt.detach().to("cpu", torch.float32).numpy())
    require(bool(np.isfinite(data).all()), "KMeans input contains NaN or Inf (check the captured features)")

    km = faiss.Kmeans(
        dim,
        k,
        niter=niter,
        seed=int(seed),
        nredo=1,
        verbose=False,
        gpu=backend == "gpu",
        # use all tokens and silence the "too few points" warning for small inputs
        max_points_per_centroid=(t + k - 1) // k + 1,
        min_points_per_centroid=1,
    )
    km.train(data, init_centroids=kmeans_plusplus(data, k, seed) if init == "kmeans++" else None)
    centroids = torch.from_numpy(np.array(km.centroids, dtype=np.float32).reshape(k, dim))
    assignment, d2 = _nearest(torch.from_numpy(data), centroids)
    inertia = float(d2.sum())
    return centroids.to(device), assignment.to(device), inertia


def assign_clusters(x: Tensor, mean: Tensor, components: Tensor, centroids: Tensor) -> Tensor:
    """Label tokens [T, d] with their nearest centroid after projecting with the stored PCA."""
    z = pca_project(x, mean, components)
    require(
        centroids.dim() == 2 and centroids.shape[1] == z.shape[1],
        f"centroids have shape {tuple(centroids.shape)} but the PCA projects to {z.shape[1]} dims",
    )
    return _nearest(z, centroids)[0]


# ------------------------------------------------------------------- cluster centres and Eq. 6


class CenterStats:
    """Streaming per-cluster feature sums, so centres of a [T, n] feature matrix (e.g. the
    W_down input of a 7B model, 8 GB in fp16 at T=256k) can be built chunk by chunk."""

    def __init__(self, k: int, n: int, device: torch.device | str = "cpu"):
        require(k >= 1 and n >= 1, f"CenterStats needs k >= 1 and n >= 1, got k={k}, n={n}")
        self.k, self.n = k, n
        # float64 sums: tens of thousands of fp16 rows summed in float32 lose ~3 digits
        self.sums = torch.zeros(k, n, dtype=torch.float64, device=device)
        self.counts = torch.zeros(k, dtype=torch.float64, device=device)

    def add_batch(self, features: Tensor, assignment: Tensor) -> None:
        require(features.dim() == 2 and features.shape[1] == self.n, f"features must be [T, {self.n}], got {tuple(features.shape)}")
        require(
            assignment.dim() == 1 and assignment.shape[0] == features.shape[0],
            f"assignment must be [T={features.shape[0]}], got {tuple(assignment.shape)}",
        )
        a = assignment.to(device=self.sums.device, dtype=torch.long)
        if a.numel():
            require(int(a.min()) >= 0 and int(a.max()) < self.k, f"cluster labels must be in [0, {self.k})")
        self.sums.index_add_(0, a, features.to(device=self.sums.device, dtype=torch.float64))
        self.counts.index_add_(0, a, torch.ones_like(a, dtype=torch.float64))

    @property
    def centers(self) -> Tensor:
        """[k, n] float32 means; an empty cluster gets a zero centre (no division by zero)."""
        return (self.sums / self.counts.clamp(min=1.0)[:, None]).float()


def cluster_centers(features: Tensor, assignment: Tensor, k: int) -> Tensor:
    """Mean feature vector per cluster: [k, n] float32 (zeros for an empty cluster)."""
    features = _as_matrix(features, "features")
    stats = CenterStats(k, features.shape[1], device=features.device)
    stats.add_batch(features, assignment)
    return stats.centers


def center_distances(centers: Tensor) -> Tensor:
    """Pairwise L2 distances between cluster centres: D [k, k] (Eq. 6), zero diagonal.

    Explicit differences in float64 (k is tiny) instead of torch.cdist's matmul shortcut, which
    can return small non-zero or NaN-adjacent values on the diagonal.
    """
    require(centers.dim() == 2, f"centers must be [k, n], got shape {tuple(centers.shape)}")
    c = centers.double()
    # one row at a time: the [k, k, n] difference cube is 23 GB at k=1000, n=1536; a row is [k, n]
    d = torch.empty(c.shape[0], c.shape[0], dtype=torch.float64, device=c.device)
    for i in range(c.shape[0]):
        d[i] = ((c - c[i]) ** 2).sum(dim=-1).sqrt()
    return d.float()


def relevance_weights(distances: Tensor, tau: float, mode: str = "ours") -> Tensor:
    """Token-cluster weights alpha [k, k]: row g weights token cluster j for neuron group g.

    - "ours": softmax(-d_g / tau) per row (Eq. 6); the matched cluster (distance 0) weighs most.
    - "uniform": every cluster 1/k.  - "reverse": softmax(+d_g / tau), far clusters weigh most.
    - "only_matched": identity (each group sees only its own cluster's tokens).
    Every row sums to 1 (Table 6 ablations).
    """
    require(
        distances.dim() == 2 and distances.shape[0] == distances.shape[1],
        f"distances must be a square [k, k] matrix, got shape {tuple(distances.shape)}",
    )
    require(mode in RELEVANCE_MODES, f"unknown relevance mode {mode!r}: use one of {', '.join(RELEVANCE_MODES)}")
    require(isinstance(tau, (int, float)) and tau > 0, f"tau={tau} must be positive (softmax temperature)")
    k = distances.shape[0]
    d = distances.double()
    if mode == "ours":
        alpha = torch.softmax(-d / tau, dim=1)
    elif mode == "reverse":
        alpha = torch.softmax(d / tau, dim=1)
    elif mode == "uniform":
        alpha = torch.full_like(d, 1.0 / k)
    else:
        alpha = torch.eye(k, dtype=torch.float64, device=d.device)
    return alpha.to(distances.dtype if distances.is_floating_point() else torch.float32)


def cluster_bytes(n_layers: int, n_tok: int, d: int, n_ffn: int, k: int, pca_dim: int) -> int:
    """Peak bytes of the cluster stage, roughly: the output arrays plus one layer's working set."""
    outputs = 4 * n_layers * (d + pca_dim * d + k * pca_dim + n_tok + 2 * k + k * n_ffn + k * k)
    layer = n_tok * d * 4 + n_tok * pca_dim * (4 + 4 + 8)  # features, projection, KMeans copies
    layer += 8 * n_tok * (3 + int(np.log(max(k, 2))))  # k-means++ candidate distances
    layer += 4 * 32768 * k + 256 * 2**20  # faiss's distance blocks, the exact assignment's chunk
    layer += 8 * k * n_ffn * 3  # centre sums and a row of centre differences
    return outputs + layer


def cluster_layers(proj, n_layers: int, k: int, niter: int, seed: int, device: torch.device, backend: str,
                   label: str = "cluster") -> dict[str, np.ndarray]:
    """KMeans of every layer's PCA-projected FFN-input tokens (`proj[layer]`: [T, pca_dim], e.g. the capture
    store's ffn_proj) -> centroids [L, k, pca_dim], token_clusters [L, T], cluster_sizes [L, k], inertia [L]."""
    n_tok, pca_dim = proj.shape[1], proj.shape[2]
    out = {
        "centroids": np.zeros((n_layers, k, pca_dim), np.float32),
        "token_clusters": np.zeros((n_layers, n_tok), np.int32),
        "cluster_sizes": np.zeros((n_layers, k), np.int64),
        "inertia": np.zeros(n_layers, np.float64),
    }
    with progress() as bar:
        task = bar.add_task(label, total=n_layers)
        for li in range(n_layers):
            centroids, assign, inertia = kmeans(torch.from_numpy(proj[li]).to(device), k, niter, seed, backend=backend)
            assign = assign.cpu()
            out["centroids"][li], out["token_clusters"][li] = centroids.cpu().numpy(), assign.numpy()
            out["cluster_sizes"][li] = np.bincount(assign.numpy(), minlength=k)
            out["inertia"][li] = inertia
            bar.advance(task)
    return out
