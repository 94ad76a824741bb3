"""Functional networks by ICA (seed 003, Pruning LLMs by Identifying and Preserving Functional Networks).

Per layer, the FFN is observed as 2 x n_ffn signals over the calibration tokens: act_fn(gate_proj(x))
(columns 0..n-1) and up_proj(x) (columns n..2n-1). CanICA as in the authors' code: z-score every
column over tokens, keep the top `n_components` right singular vectors (one row per neuron column),
run FastICA over the neuron columns (spatial ICA: neurons are the samples), and z-score each
component's spatial map across neurons. A neuron is "key" if |z| > T in any component for its act
or its up column; the kept set is the union.

Tensor functions, and the consumer (`IcaConsumer`) that decomposes each layer as the dense model's MLP
activations stream past (`fang.model.mlp_stream`); the `ica` stage stores the maps, and the methods
`ica_fn` / `ica_fn_ranked` (`fang.methods.ica_fn`: the threshold bisection) prune from them.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from ..core.errors import FangError, require

if TYPE_CHECKING:
    from ..core.params import IcaParams

# Edge layers the paper leaves dense: the first three and the last two blocks.
DENSE_HEAD, DENSE_TAIL = 3, 2


def zscore_columns(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Each column of [T, C] minus its mean over tokens, over its std (constant columns: std 1, as the authors do).

    Pass `out=x` to work in place: the stage's matrix is the largest thing it holds.
    """
    require(x.dim() == 2 and x.shape[0] > 1, f"zscore_columns: need [tokens > 1, columns], got {tuple(x.shape)}")
    out = x.clone() if out is None else out
    # column slices: whole-matrix mean/std would allocate float64 / squared copies of the layer matrix
    for cols in out.split(256, dim=1):
        c = cols.double()
        mean, std = c.mean(0), c.std(0)
        std = torch.where(std < torch.finfo(x.dtype).eps, torch.ones_like(std), std)
        cols.copy_((c - mean) / std)
    return out


def zscore_maps(maps: Tensor) -> Tensor:
    """Each component's spatial map [k, C] z-scored across neurons (the authors' sample std)."""
    mean = maps.mean(1, keepdim=True)
    std = maps.std(1, keepdim=True).clamp_min(torch.finfo(maps.dtype).eps)
    return (maps - mean) / std


@dataclass
class IcaResult:
    maps: Tensor  # [k, C] spatial maps z-scored across neurons (float32)
    explained_variance: float  # fraction of the z-scored signals' variance the k singular vectors hold
    sparsity: float  # nilearn's criterion of the kept restart: max over components of sum |z| (lower = sparser)
    restart: int  # which seeded restart was kept
    converged: int  # restarts whose FastICA converged within max_iter


def reduce_svd(signals: Tensor, n_components: int, n_iter: int = 4, seed: int = 0) -> tuple[Tensor, float]:
    """Top right singular vectors of z-scored [T, C] signals as [C, k], and the variance fraction they hold.

    Randomized (Halko et al., torch.svd_lowrank) with a few power iterations: the full SVD of the
    authors' code costs O(T C^2), this O(T C k).
    """
    t, c = signals.shape
    require(0 < n_components <= min(t, c),
            f"ica.n_components={n_components} must be in [1, min(tokens, 2 x n_ffn)] = [1, {min(t, c)}]")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, s, v = torch.svd_lowrank(signals, q=min(n_components + 10, t, c), niter=n_iter)
    # in column slices: a float64 copy of the whole matrix would double the stage's peak RAM
    total = sum(float(cols.double().pow(2).sum()) for cols in signals.split(256, dim=1))
    kept = float(s[:n_components].double().pow(2).sum())
    return v[:, :n_components].contiguous(), kept / max(total, 1e-30)


def fastica_maps(components: Tensor, n_restarts: int = 5, seed: int = 0, max_iter: int = 400,
                 tol: float = 1e-4) -> tuple[Tensor, float, int, int]:
    """FastICA (scikit-learn, cube non-linearity) on [C, k] reduced components, rows as samples.

    Runs `n_restarts` seeded restarts and keeps the sparsest (nilearn CanICA's rule: the smallest
    maximum L1 norm of a z-scored map). Returns (maps [k, C] z-scored, sparsity, restart, converged).
    """
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    require(n_restarts >= 1, f"ica.n_restarts={n_restarts} must be at least 1")
    x = components.detach().double().cpu().numpy()
    best: tuple[Tensor, float, int] | None = None
    converged = 0
    for r in range(n_restarts):
        ica = FastICA(n_components=x.shape[1], fun="cube", whiten="unit-variance", max_iter=max_iter, tol=tol,
                      random_state=seed * 1000 + r)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            sources = ica.fit_transform(x)  # [C, k]
        converged += not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        if not np.isfinite(sources).all():
            continue
        maps = zscore_maps(torch.from_numpy(sources.T.copy()))
        sparsity = float(maps.abs().sum(1).max())
        if best is None or sparsity < best[1]:
            best = (maps, sparsity, r)
    if best is None:
        raise FangError("FastICA produced non-finite maps in every restart: the layer's signals are degenerate "
                        "(lower ica.n_components or use more calibration tokens)")
    return best[0].float(), best[1], best[2], converged


def canica(signals: Tensor, n_components: int, n_restarts: int = 5, seed: int = 0, max_iter: int = 400,
           tol: float = 1e-4, svd_iter: int = 4) -> IcaResult:
    """CanICA of one layer's already z-scored [T, C] signals: SVD reduction, then FastICA restarts."""
    comps, explained = reduce_svd(signals, n_components, svd_iter, seed)
    maps, sparsity, restart, converged = fastica_maps(comps, n_restarts, seed, max_iter, tol)
    return IcaResult(maps, explained, sparsity, restart, converged)


def neuron_score(maps: Tensor) -> Tensor:
    """`ranked` score of each FFN neuron: max |z| over components and over its act and up columns -> [n].

    A neuron is key at threshold T exactly when this score exceeds T, so the score also drives the
    faithful mode's bisection.
    """
    require(maps.dim() == 2 and maps.shape[1] % 2 == 0,
            f"neuron_score: maps must be [components, 2 x n_ffn], got {tuple(maps.shape)}")
    n = maps.shape[1] // 2
    top = maps.abs().amax(0)
    return torch.maximum(top[:n], top[n:])


def key_neurons(maps: Tensor, threshold: float) -> Tensor:
    """The paper's key set: |z| > T in any component, for the act or the up column (union) -> bool [n]."""
    n = maps.shape[1] // 2
    hit = (maps.abs() > threshold).any(0)
    return hit[:n] | hit[n:]


def prunable_layers(n_layers: int) -> list[int]:
    """Blocks the faithful mode prunes: all but the first three and the last two."""
    return list(range(DENSE_HEAD, max(DENSE_HEAD, n_layers - DENSE_TAIL)))


# |z| thresholds reported in the summary: the number of key neurons each would keep per layer
REPORT_THRESHOLDS = (2.0, 3.0, 3.6, 5.0)


class IcaConsumer:
    """The `fang.model.mlp_stream.stream_mlp` consumer of the ica stage: one layer's act and up signals
    [T, 2 n_ffn] at a time, decomposed at the end of the layer into `maps` and `score` (one row per layer)."""

    def __init__(self, p: "IcaParams", n_tok: int, n_layers: int, n_ffn: int) -> None:
        self.p, self.n_ffn = p, n_ffn
        self.signals = torch.empty(n_tok, 2 * n_ffn, dtype=torch.float32)
        self.maps = np.zeros((n_layers, p.n_components, 2 * n_ffn), np.float32)
        self.score = np.zeros((n_layers, n_ffn), np.float32)
        self.layers: list[dict] = []

    def add(self, layer: int, rows: slice, act: Tensor, up: Tensor) -> None:
        self.signals[rows, : self.n_ffn] = act.cpu()
        self.signals[rows, self.n_ffn :] = up.cpu()

    def end_layer(self, layer: int, mlp: nn.Module) -> None:
        t0 = time.perf_counter()
        zscore_columns(self.signals, out=self.signals)
        res = canica(self.signals, self.p.n_components, self.p.n_restarts, self.p.seed + layer, self.p.max_iter,
                     self.p.tol, self.p.svd_iter)
        score = neuron_score(res.maps)
        self.maps[layer], self.score[layer] = res.maps.numpy(), score.numpy()
        self.layers.append({
            "layer": layer, "explained_variance": round(res.explained_variance, 4), "sparsity": round(res.sparsity, 2),
            "kept_restart": res.restart, "converged_restarts": res.converged,
            "key_neurons": {str(t): int((score > t).sum()) for t in REPORT_THRESHOLDS},
            "seconds": round(time.perf_counter() - t0, 2),
        })
