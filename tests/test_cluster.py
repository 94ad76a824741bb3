import pytest
import torch

from fang.analysis.cluster import (
    CenterStats,
    assign_clusters,
    center_distances,
    cluster_centers,
    kmeans,
    pca_fit,
    pca_project,
    relevance_weights,
)
from fang.core.errors import FangError


def _blobs(n_per=200, k=4, dim=16, sep=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=g) * sep
    labels = torch.arange(k).repeat_interleave(n_per)
    x = centers[labels] + torch.randn(k * n_per, dim, generator=g)
    perm = torch.randperm(k * n_per, generator=g)
    return x[perm], labels[perm]


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to a relabelling: the pairs (a_i, b_i) define a bijection."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ------------------------------------------------------------------------------------- PCA


def test_pca_matches_svd_subspace_and_variance():
    g = torch.Generator().manual_seed(0)
    # anisotropic data with a clear spectrum so components are well defined
    scales = torch.linspace(5.0, 0.1, 12)
    x = (torch.randn(500, 12, generator=g) * scales) @ torch.linalg.qr(torch.randn(12, 12, generator=g))[0]
    x = x + 3.0
    mean, comps = pca_fit(x, 4)
    assert mean.shape == (12,) and comps.shape == (4, 12)
    assert torch.allclose(mean, x.mean(0), atol=1e-5)
    xc = (x - x.mean(0)).double()
    _, sv, vt = torch.linalg.svd(xc, full_matrices=False)
    ref = vt[:4]
    # same subspace: projector difference vanishes
    p1, p2 = comps.double().T @ comps.double(), ref.T @ ref
    assert torch.allclose(p1, p2, atol=1e-5)
    # each component equals the SVD one up to sign
    assert torch.allclose((comps.double() * ref).sum(1).abs(), torch.ones(4, dtype=torch.float64), atol=1e-5)
    # explained variance equals the squared singular values / (T - 1)
    z = pca_project(x, mean, comps).double()
    assert torch.allclose(z.var(0), sv[:4] ** 2 / (500 - 1), rtol=1e-4)
    # orthonormal rows, descending variance
    assert torch.allclose(comps @ comps.T, torch.eye(4), atol=1e-5)
    assert (z.var(0)[:-1] >= z.var(0)[1:]).all()


def test_pca_sign_is_deterministic_and_fp16_ok():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    m1, c1 = pca_fit(x, 3)
    m2, c2 = pca_fit(x.clone(), 3)
    assert torch.equal(c1, c2) and torch.equal(m1, m2)
    pivot = c1.abs().argmax(1)
    assert (c1[torch.arange(3), pivot] > 0).all()
    _, c16 = pca_fit(x.half(), 3)
    assert c16.dtype == torch.float32
    assert torch.allclose((c16 * c1).sum(1), torch.ones(3), atol=1e-2)


def test_pca_fit_project_is_the_fit_then_the_projection_bit_for_bit():
    from fang.analysis.cluster import pca_fit_project

    x = (torch.randn(300, 24, generator=torch.Generator().manual_seed(3)) * 2 + 5).half()
    mean, comps, proj = pca_fit_project(x, 6)
    ref_mean, ref_comps = pca_fit(x, 6)
    assert torch.equal(mean, ref_mean) and torch.equal(comps, ref_comps)
    assert torch.equal(proj, pca_project(x, ref_mean, ref_comps))


def test_pca_errors():
    x = torch.randn(10, 5)
    with pytest.raises(FangError, match="exceeds the feature dimension"):
        pca_fit(x, 6)
    with pytest.raises(FangError, match="number of tokens"):
        pca_fit(torch.randn(3, 5), 4)
    with pytest.raises(FangError, match="2-D"):
        pca_fit(torch.randn(2, 3, 4), 2)
    m, c = pca_fit(x, 2)
    with pytest.raises(FangError, match="shape mismatch"):
        pca_project(torch.randn(4, 6), m, c)


# ---------------------------------------------------------------------------------- KMeans


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_recovers_blobs(seed):
    x, labels = _blobs(seed=seed)
    cent, assign, inertia = kmeans(x, 4, niter=20, seed=seed)
    assert cent.shape == (4, 16) and assign.shape == (800,) and assign.dtype == torch.long
    # perfect up to a permutation of labels (k-means++ seeding; faiss's random init often fails here)
    assert _same_partition(assign, labels)
    # inertia is the within-cluster sum of squares of the returned assignment
    ref = ((x.double() - cent.double()[assign]) ** 2).sum().item()
    assert inertia == pytest.approx(ref, rel=1e-9)


def test_kmeans_numpy_input_and_seed_determinism():
    import faiss

    x, _ = _blobs(n_per=300, k=5, sep=1.0, seed=3)  # overlapping blobs: seed actually matters
    xn = x.numpy()
    a = kmeans(xn, 5, niter=10, seed=7)
    b = kmeans(xn, 5, niter=10, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    # also identical across OpenMP thread counts (faiss parallelises by centroid / by block)
    old = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        c = kmeans(xn, 5, niter=10, seed=7)
        faiss.omp_set_num_threads(3)
        d = kmeans(xn, 5, niter=10, seed=7)
    finally:
        faiss.omp_set_num_threads(old)
    for r in (c, d):
        assert torch.equal(a[0], r[0]) and torch.equal(a[1], r[1])


def test_kmeans_random_init_runs():
    x, _ = _blobs(n_per=50, k=3)
    cent, assign, _ = kmeans(x, 3, niter=5, seed=0, init="random")
    assert cent.shape == (3, 16) and int(assign.max()) < 3


def test_kmeans_errors():
    with pytest.raises(FangError, match="only 3 tokens"):
        kmeans(torch.randn(3, 4), 5)
    with pytest.raises(FangError, match="NaN"):
        kmeans(torch.full((10, 2), float("nan")), 2)
    with pytest.raises(FangError, match="init"):
        kmeans(torch.randn(10, 2), 2, init="forgy")


def test_assign_clusters_matches_kmeans_on_fit_data():
    x, _ = _blobs(n_per=150, k=3, dim=32, sep=2.0, seed=5)
    mean, comps = pca_fit(x, 8)
    z = pca_project(x, mean, comps)
    cent, assign, _ = kmeans(z, 3, niter=15, seed=1)
    assert torch.equal(assign_clusters(x, mean, comps, cent), assign)
    # fp16 inputs (as stored by capture) are accepted
    assert assign_clusters(x.half(), mean, comps, cent).shape == (450,)


# ------------------------------------------------------------------ centres, distances, Eq. 6


def test_cluster_centers_and_empty_cluster():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    a = torch.tensor([0, 0, 2])
    c = cluster_centers(f, a, 4)
    assert torch.equal(c, torch.tensor([[2.0, 3.0], [0.0, 0.0], [10.0, 0.0], [0.0, 0.0]]))
    # streaming in chunks gives the same centres
    s = CenterStats(4, 2)
    s.add_batch(f[:1], a[:1])
    s.add_batch(f[1:], a[1:])
    assert torch.equal(s.centers, c)
    with pytest.raises(FangError, match="cluster labels"):
        cluster_centers(f, torch.tensor([0, 1, 4]), 4)


def test_center_distances():
    c = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    d = center_distances(c)
    expected = torch.tensor([[0.0, 5.0, 1.0], [5.0, 0.0, 18**0.5], [1.0, 18**0.5, 0.0]])
    assert torch.allclose(d, expected)
    assert torch.equal(d, d.T) and (d.diagonal() == 0).all()


def test_relevance_weights_modes():
    d = torch.tensor([[0.0, 1.0, 4.0], [1.0, 0.0, 2.0], [4.0, 2.0, 0.0]])
    for mode in ("ours", "uniform", "reverse", "only_matched"):
        a = relevance_weights(d, 2.0, mode)
        assert a.shape == (3, 3)
        assert torch.allclose(a.sum(1), torch.ones(3))
    ours = relevance_weights(d, 2.0)
    assert torch.allclose(ours[0], torch.softmax(torch.tensor([0.0, -0.5, -2.0]), 0))
    # own cluster weighs most, and closer clusters weigh more
    assert (ours.argmax(1) == torch.arange(3)).all()
    assert ours[0, 1] > ours[0, 2]
    rev = relevance_weights(d, 2.0, "reverse")
    assert (rev.argmin(1) == torch.arange(3)).all() and rev[0, 2] > rev[0, 1]
    assert torch.allclose(relevance_weights(d, 2.0, "uniform"), torch.full((3, 3), 1 / 3))
    assert torch.equal(relevance_weights(d, 2.0, "only_matched"), torch.eye(3))
    # temperature: large tau -> near uniform, small tau -> near identity
    assert torch.allclose(relevance_weights(d, 1e6), torch.full((3, 3), 1 / 3), atol=1e-5)
    assert torch.allclose(relevance_weights(d, 1e-3), torch.eye(3), atol=1e-6)


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_relevance_weights_errors(tau):
    d = torch.zeros(2, 2)
    with pytest.raises(FangError, match="tau"):
        relevance_weights(d, tau)
    with pytest.raises(FangError, match="unknown relevance mode"):
        relevance_weights(d, 1.0, "closest")
