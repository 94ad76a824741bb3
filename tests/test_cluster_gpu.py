"""Choosing faiss's GPU k-means when CUDA is present, tested on CPU with a mocked capability."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from fang.analysis.cluster import kmeans, kmeans_backend
from fang.core.errors import FangError


def _faiss(n_gpus: int | None):
    """A stand-in faiss module: the CPU build has no get_num_gpus at all."""
    return types.SimpleNamespace() if n_gpus is None else types.SimpleNamespace(get_num_gpus=lambda: n_gpus)


def test_backend_gpu_only_with_cuda_and_a_gpu_faiss(monkeypatch):
    monkeypatch.delenv("FANG_DEVICE", raising=False)
    assert kmeans_backend(_faiss(1), cuda_available=True) == "gpu"
    assert kmeans_backend(_faiss(1), cuda_available=False) == "cpu"
    assert kmeans_backend(_faiss(0), cuda_available=False) == "cpu"


def test_backend_cuda_with_cpu_faiss_warns_and_falls_back(monkeypatch):
    monkeypatch.delenv("FANG_DEVICE", raising=False)
    for faiss in (_faiss(None), _faiss(0)):
        with pytest.warns(UserWarning, match=r"faiss is a CPU build.*\.\[gpu\]"):
            assert kmeans_backend(faiss, cuda_available=True) == "cpu"


def test_backend_follows_fang_device(monkeypatch):
    monkeypatch.setenv("FANG_DEVICE", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # forcing CPU is a choice, not something to warn about
        assert kmeans_backend(_faiss(1), cuda_available=True) == "cpu"
    monkeypatch.setenv("FANG_DEVICE", "cuda:0")
    assert kmeans_backend(_faiss(1), cuda_available=True) == "gpu"


def test_kmeans_hands_the_choice_to_faiss(monkeypatch):
    """With CUDA and a GPU faiss (mocked), faiss.Kmeans is built with gpu=True; the run itself stays on CPU."""
    import faiss

    seen = []
    real = faiss.Kmeans

    def recording_kmeans(*args, gpu=False, **kwargs):
        seen.append(gpu)
        return real(*args, gpu=False, **kwargs)

    monkeypatch.delenv("FANG_DEVICE", raising=False)
    monkeypatch.setattr(faiss, "Kmeans", recording_kmeans)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    mocked = kmeans(x, 3, niter=5, seed=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plain = kmeans(x, 3, niter=5, seed=0)
    assert seen == [True, False]
    assert torch.equal(mocked[0], plain[0]) and torch.equal(mocked[1], plain[1])


def test_gpu_backend_without_a_gpu_is_one_line_error(monkeypatch):
    import faiss

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    with pytest.raises(FangError, match="faiss sees no GPU"):
        kmeans(torch.randn(50, 3), 2, backend="gpu")
    with pytest.raises(FangError, match="unknown k-means backend"):
        kmeans(torch.randn(50, 3), 2, backend="tpu")


def _gpu_faiss() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return torch.cuda.is_available() and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


@pytest.mark.skipif(not _gpu_faiss(), reason="needs CUDA and the faiss GPU build")
def test_kmeans_gpu_matches_cpu():
    """The stated tolerance: centroids within 1e-4 of the data scale, labels equal but for float32 near-ties."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2000, 16, generator=g) + 3 * torch.randn(1, 16, generator=g) for _ in range(7)])
    cpu = kmeans(x, 7, niter=25, seed=0, backend="cpu")
    gpu = kmeans(x, 7, niter=25, seed=0, backend="gpu")
    scale = float(x.std())
    assert torch.allclose(gpu[0], cpu[0], atol=1e-4 * scale, rtol=0)
    assert float((gpu[1] == cpu[1]).float().mean()) >= 0.999
    assert gpu[2] == pytest.approx(cpu[2], rel=1e-5)
