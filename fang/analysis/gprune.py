"""GPrune-LLM (seed 002, Liu et al.): generalization-aware FFN pruning from several calibration sources.

Only the abstract and figure captions are public. What they fix, and what is ours ("ours:" below
and in docs/methods.md):
- neuron importance is an activation metric computed per calibration source (base metric a
  parameter); a neuron's rank drift across sources measures its distribution sensitivity;
- neurons are partitioned per layer into modules by data-free parameter similarity and rank-drift
  behaviour (the paper refines with a differentiable objective; ours: k-means on parameters, then
  k-means on parameters + rank-drift profile started from it);
- per module, mean rank drift and cross-source Kendall tau; a distribution-sensitive module
  (Fig. 1: high drift, near-zero cross-dataset correlation; ours: its mean tau is not
  significantly above 0) with low activation scores is ranked by an activation-independent metric
  instead (weight magnitude);
- ranking is local to a module, and module-wise sparsity is learned under the budget (the paper
  trains thresholds; ours: a closed form in the module's drift, shifted by bisection to the budget:
  `fang.methods.gprune`, which prunes from what this module computes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from ..core.errors import require

if TYPE_CHECKING:
    from ..core.params import GPruneParams

METRICS = ("wanda_sp", "flap")
SWITCH_RULES = ("sensitive_and_weak", "sensitive_or_weak")


class SourceMoments:
    """Per-source token count, sum and sum of squares of every neuron's activation h = act(gate) * up (float64)."""

    def __init__(self, n_sources: int, n_ffn: int) -> None:
        self.count = torch.zeros(n_sources, dtype=torch.float64)
        self.sum = torch.zeros(n_sources, n_ffn, dtype=torch.float64)
        self.sum_sq = torch.zeros(n_sources, n_ffn, dtype=torch.float64)

    def add(self, h: Tensor, source: Tensor) -> None:
        """h [tokens, n_ffn], source [tokens] with -1 for tokens of no used source."""
        used = source >= 0
        h, source = h[used].double().cpu(), source[used].cpu()
        self.count.index_add_(0, source, torch.ones_like(source, dtype=torch.float64))
        self.sum.index_add_(0, source, h)
        self.sum_sq.index_add_(0, source, h * h)


def source_scores(metric: str, m: SourceMoments, w_down: Tensor) -> Tensor:
    """Activation score of each neuron under each source -> [S, n] float64.

    wanda_sp: ||W_down[:, j]||_1 x RMS_s(h_j); flap: Var_s(h_j) x ||W_down[:, j]||_2^2 (FLAP's fluctuation).
    Per-token moments (ours) so that sources of different sizes give comparable magnitudes.
    """
    require(metric in METRICS, f"gprune.metric={metric!r}: use {' or '.join(METRICS)}")
    require(bool((m.count > 0).all()), "a calibration source has no tokens: every source needs some")
    n = m.count[:, None]
    w = w_down.detach().double().cpu()
    if metric == "wanda_sp":
        return w.abs().sum(0) * (m.sum_sq / n).sqrt()
    var = (m.sum_sq / n - (m.sum / n) ** 2).clamp_min(0)
    return var * w.pow(2).sum(0)


def normalized_ranks(scores: Tensor) -> Tensor:
    """Rank of each neuron within each source, scaled to [0, 1] (1 = most important) -> [S, n]."""
    n = scores.shape[-1]
    ranks = scores.argsort(-1).argsort(-1).double()
    return ranks / max(n - 1, 1)


def rank_drift(ranks: Tensor) -> Tensor:
    """Per-neuron rank drift: std over sources of its normalized rank (ours; independent random ranks give ~0.29)."""
    return ranks.std(0, unbiased=False)


def activation_score(scores: Tensor) -> Tensor:
    """Source-averaged score, each source first divided by its layer mean (ours) -> [n], layer mean 1."""
    return (scores / scores.mean(-1, keepdim=True).clamp_min(1e-30)).mean(0)


def magnitude_score(w_down: Tensor) -> Tensor:
    """Activation-independent score: ||W_down[:, j]||_2, fang's magnitude baseline (ours: the paper names no metric)."""
    return torch.linalg.vector_norm(w_down.detach().double().cpu(), dim=0)


def param_features(w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Data-free neuron features [n, 3d]: the unit-normalized gate row, up row and down column, joined (unit norm)."""
    def unit(x: Tensor) -> Tensor:
        x = x.detach().double().cpu()
        return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-30)

    return torch.cat([unit(w_gate), unit(w_up), unit(w_down.T)], 1) / 3 ** 0.5


def find_modules(features: Tensor, ranks: Tensor, n_modules: int, drift_weight: float = 1.0,
                 refine_iter: int = 20, seed: int = 0) -> Tensor:
    """Module id per neuron [n] (0..M-1, M <= n_modules).

    Ours: k-means on the parameter features, then k-means on [features, w x centred rank profile /
    sqrt(S)] started from those modules, so neurons of one module also move alike across sources.
    """
    from sklearn.cluster import KMeans

    n = features.shape[0]
    k = min(n_modules, n)
    x = features.numpy()
    labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x).labels_
    if drift_weight > 0 and refine_iter > 0 and k > 1:
        profile = ((ranks - ranks.mean(0)) / ranks.shape[0] ** 0.5).T.numpy()
        joint = np.concatenate([x, drift_weight * profile], 1)
        start = np.stack([joint[labels == c].mean(0) for c in np.unique(labels)])
        labels = KMeans(n_clusters=len(start), init=start, n_init=1, max_iter=refine_iter).fit(joint).labels_
    _, labels = np.unique(labels, return_inverse=True)
    return torch.from_numpy(labels.astype(np.int64))


def mean_kendall_tau(scores: Tensor) -> float:
    """Mean Kendall tau (tau-a; ours: ties are negligible for continuous scores) over all source pairs, [S, m] -> float.

    A module of fewer than 2 neurons has no ranking to disagree on: 1.0.
    """
    s, m = scores.shape
    if m < 2 or s < 2:
        return 1.0
    signs = torch.sign(scores[:, :, None] - scores[:, None, :]).reshape(s, -1)
    tau = signs @ signs.T / (m * (m - 1))
    return float(tau[torch.triu_indices(s, s, 1).unbind()].mean())


def null_tau_se(size: Tensor, n_sources: int) -> Tensor:
    """Standard error of a module's mean cross-source Kendall tau if the sources ranked its neurons
    independently, [M] -> [M] (inf where fewer than 2 neurons or sources: nothing to test).

    One pair's tau-a has variance 2(2m + 5) / (9 m (m - 1)) under independence (Kendall, 1938); the
    taus of different source pairs are then uncorrelated (E[sign(a_i - a_j)] = 0 for each source), so
    the mean over the P = S(S - 1)/2 pairs has 1/P of it.
    """
    m = size.double()
    pairs = n_sources * (n_sources - 1) / 2
    var = 2 * (2 * m + 5) / (9 * m * (m - 1)).clamp_min(1e-300) / max(pairs, 1)
    return torch.where((m >= 2) & (pairs >= 1), var.sqrt(), torch.full_like(m, float("inf")))


@dataclass
class ModuleStats:
    size: Tensor  # [M] neurons per module
    drift: Tensor  # [M] mean rank drift
    tau: Tensor  # [M] mean cross-source Kendall tau of the activation scores
    tau_z: Tensor  # [M] tau over its standard error under independent sources: the sensitivity test
    act: Tensor  # [M] mean activation score (layer mean 1)


def module_stats(modules: Tensor, scores: Tensor, drift: Tensor, act: Tensor) -> ModuleStats:
    m = int(modules.max()) + 1
    size = torch.bincount(modules, minlength=m)
    mean = lambda v: torch.zeros(m, dtype=torch.float64).index_add_(0, modules, v.double()) / size.clamp_min(1)  # noqa: E731
    tau = torch.tensor([mean_kendall_tau(scores[:, modules == c]) for c in range(m)], dtype=torch.float64)
    se = null_tau_se(size, scores.shape[0])
    tau_z = torch.where(se.isinf(), torch.full_like(tau, float("inf")), tau / se)  # nothing to test: not sensitive
    return ModuleStats(size, mean(drift), tau, tau_z, mean(act))


def reliability_switch(stats: ModuleStats, min_tau_z: float, weak_ratio: float,
                       rule: str = "sensitive_and_weak") -> Tensor:
    """Modules whose activation ranking is unreliable -> bool [M] (rank them by weight magnitude).

    Sensitive = the sources do not agree on the module's ranking beyond chance: mean Kendall tau
    under `min_tau_z` standard errors above 0 (Fig. 1's "near-zero cross-dataset correlation"; ours:
    the paper names the rank drift as indicator but no threshold, and a test against independence
    carries to any model and source count where a fixed drift cut does not). Weak = mean activation
    score below `weak_ratio` x the layer mean. Fig. 2 switches sensitive modules with low scores
    (`sensitive_and_weak`); `sensitive_or_weak` is the looser reading of the abstract.
    """
    require(rule in SWITCH_RULES, f"gprune.switch={rule!r}: use {' or '.join(SWITCH_RULES)}")
    sensitive = stats.tau_z < min_tau_z
    weak = stats.act < weak_ratio
    return sensitive & weak if rule == "sensitive_and_weak" else sensitive | weak


def within_module_score(act: Tensor, magnitude: Tensor, modules: Tensor, switched: Tensor) -> Tensor:
    """Score each neuron is ranked by inside its module: activation, or magnitude where the module switched."""
    return torch.where(switched[modules], magnitude.double(), act.double())


@dataclass
class LayerModules:
    scores: Tensor  # [S, n] activation score per source
    ranks: Tensor  # [S, n]
    drift: Tensor  # [n]
    act: Tensor  # [n]
    magnitude: Tensor  # [n]
    modules: Tensor  # [n]
    stats: ModuleStats
    switched: Tensor  # [M]
    score: Tensor  # [n] within-module ranking score


def analyze_layer(metric: str, moments: SourceMoments, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                  n_modules: int, drift_weight: float, refine_iter: int, min_tau_z: float, weak_ratio: float,
                  rule: str, seed: int = 0) -> LayerModules:
    """Everything GPrune decides about one layer's FFN from its per-source moments and weights."""
    scores = source_scores(metric, moments, w_down)
    ranks = normalized_ranks(scores)
    drift = rank_drift(ranks)
    act = activation_score(scores)
    modules = find_modules(param_features(w_gate, w_up, w_down), ranks, n_modules, drift_weight, refine_iter, seed)
    stats = module_stats(modules, scores, drift, act)
    switched = reliability_switch(stats, min_tau_z, weak_ratio, rule)
    mag = magnitude_score(w_down)
    return LayerModules(scores, ranks, drift, act, mag, modules, stats, switched,
                        within_module_score(act, mag, modules, switched))


class GPruneConsumer:
    """The `fang.model.mlp_stream.stream_mlp` consumer of the gprune_modules stage: each layer's act * up
    streamed into per-source moments (`source[rows]`: the source of each token), analysed at the end of the
    layer (`analyze_layer`) into the arrays of `out` (one row per layer)."""

    def __init__(self, p: "GPruneParams", source: Tensor, n_sources: int, n_layers: int, n_ffn: int) -> None:
        self.p, self.source, self.n_sources, self.n_ffn = p, source, n_sources, n_ffn
        self.moments = SourceMoments(n_sources, n_ffn)
        m = p.n_modules
        self.out = {
            "source_scores": np.zeros((n_layers, n_sources, n_ffn), np.float32),
            "ranks": np.zeros((n_layers, n_sources, n_ffn), np.float32),
            "drift": np.zeros((n_layers, n_ffn), np.float32),
            "activation_score": np.zeros((n_layers, n_ffn), np.float32),
            "magnitude_score": np.zeros((n_layers, n_ffn), np.float32),
            "modules": np.zeros((n_layers, n_ffn), np.int32),
            "score": np.zeros((n_layers, n_ffn), np.float32),
            "module_size": np.zeros((n_layers, m), np.int32),
            "module_drift": np.full((n_layers, m), np.nan, np.float32),
            "module_tau": np.full((n_layers, m), np.nan, np.float32),
            "module_tau_z": np.full((n_layers, m), np.nan, np.float32),
            "module_activation": np.full((n_layers, m), np.nan, np.float32),
            "switched": np.zeros((n_layers, m), bool),
        }
        self.layers: list[dict] = []

    def add(self, layer: int, rows: slice, act: Tensor, up: Tensor) -> None:
        self.moments.add(act * up, self.source[rows])

    def end_layer(self, layer: int, mlp: nn.Module) -> None:
        p, o = self.p, self.out
        r = analyze_layer(p.metric, self.moments, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                          p.n_modules, p.drift_weight, p.refine_iter, p.min_tau_z, p.weak_ratio, p.switch,
                          p.seed + layer)
        self.moments = SourceMoments(self.n_sources, self.n_ffn)
        m = len(r.stats.size)
        o["source_scores"][layer], o["ranks"][layer] = r.scores.numpy(), r.ranks.numpy()
        o["drift"][layer], o["activation_score"][layer] = r.drift.numpy(), r.act.numpy()
        o["magnitude_score"][layer], o["modules"][layer], o["score"][layer] = r.magnitude.numpy(), r.modules.numpy(), r.score.numpy()
        o["module_size"][layer, :m], o["module_drift"][layer, :m] = r.stats.size.numpy(), r.stats.drift.numpy()
        o["module_tau"][layer, :m], o["module_activation"][layer, :m] = r.stats.tau.numpy(), r.stats.act.numpy()
        o["module_tau_z"][layer, :m] = r.stats.tau_z.numpy()
        o["switched"][layer, :m] = r.switched.numpy()
        self.layers.append({
            "layer": layer, "modules": m, "switched": int(r.switched.sum()),
            "switched_neurons": int(r.stats.size[r.switched].sum()),
            "mean_neuron_drift": round(float(r.drift.mean()), 4),
            "module_drift": [round(float(x), 4) for x in r.stats.drift],
            "module_tau": [round(float(x), 3) for x in r.stats.tau],
            "min_module_tau_z": round(float(r.stats.tau_z.min()), 2),
        })
