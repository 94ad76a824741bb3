"""FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI 2024): tensor functions and the method.

The recipe, per decoder block:
1. stream the input of `o_proj` and `down_proj` over calibration tokens (`stats.InputStats`);
2. score each input channel by how much the layer output fluctuates through it (`fluctuation_metric`);
3. pool channels into prunable units: attention heads / KV groups / query slots (`units.AttentionUnits`),
   MLP neurons;
4. choose how many units every block keeps from one global ranking (`al_am_scores` here, ranked by the
   planning's `fang.methods.plan.structure_search`);
5. keep the top units (`base.select_top`) and fold the removed channels' mean contribution into a bias
   (`bias_compensation`), so the block's mean output on calibration data is unchanged.

Statistics are kept in float64: per-channel variances of activations with large means (LLM outliers)
lose most of their digits in float32 when accumulated over hundreds of thousands of tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.errors import require
from .base import LayerContext, MetricPruner, PruningMethod
from .stats import InputStats


def fluctuation_metric(weight: Tensor, variance: Tensor) -> Tensor:
    """FLAP's WIFV score per input channel j: variance_j * ||W[:, j]||^2 (float64, on weight's device).

    A channel matters when its input varies (a constant input can be replaced by a bias, see
    `bias_compensation`) and the weights reading it are large.
    """
    require(weight.dim() == 2, f"fluctuation_metric: weight must be [out, C], got {tuple(weight.shape)}")
    require(
        variance.dim() == 1 and variance.numel() == weight.shape[1],
        f"fluctuation_metric: variance has {variance.numel()} channels, weight has {weight.shape[1]} input channels",
    )
    col_sq_norm = torch.linalg.vector_norm(weight.detach(), dim=0, dtype=torch.float64).square()
    return variance.to(device=col_sq_norm.device, dtype=torch.float64) * col_sq_norm


def head_scores(channel_metric: Tensor, head_dim: int) -> Tensor:
    """Average the per-channel metric over each head's `head_dim` consecutive channels -> [n_heads]."""
    require(head_dim > 0, f"head_scores: head_dim={head_dim} must be positive")
    n = channel_metric.numel()
    require(n % head_dim == 0, f"head_scores: {n} channels do not split into heads of {head_dim}")
    return channel_metric.reshape(n // head_dim, head_dim).mean(1)


def standardize(metric: Tensor) -> Tensor:
    """z-score one layer's per-channel metric, as FLAP's `standarlization` does (sample std).

    A layer whose channels all score the same (or that has a single channel) has no spread to
    standardize: its channels get z = 0 (FLAP would divide by zero and produce NaN).
    """
    x = metric.detach().reshape(-1).to(torch.float64).cpu()
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    if not bool(std > 0):
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def al_am_scores(o_metric: Tensor, down_metric: Tensor, unit_columns: Tensor) -> tuple[Tensor, Tensor]:
    """One layer's unit scores for FLAP's global AL-AM search (CASIA-IVA-Lab/FLAP `prune_flap`).

    Attention: the o_proj fluctuation metric is squared, z-scored over the layer's o_proj *input
    channels*, and only then averaged over each unit's channels (FLAP: `reshape(layers, -1, 128)
    .mean(2)` per head). A unit is a head, or on GQA models a KV group or a query slot; its score is
    the mean z of all its channels, i.e. the mean of its heads' FLAP head scores.
    MLP: the down_proj fluctuation metric (not squared), z-scored over the layer's neurons.

    Standardizing channels before pooling matters: z-scoring the 3 KV-group means of a GQA layer
    would force scores that sum to 0 with squares summing to 2 whatever the layer's importance.
    Returns (attention unit scores [n_units], neuron scores [n_ffn]), float64.
    """
    require(unit_columns.dim() == 2, f"al_am_scores: unit_columns must be [units, width], got {tuple(unit_columns.shape)}")
    require(
        int(unit_columns.max()) < o_metric.numel(),
        f"al_am_scores: unit columns reach {int(unit_columns.max())} but o_proj has {o_metric.numel()} input channels",
    )
    attn_z = standardize(o_metric.to(torch.float64).square())
    return attn_z[unit_columns.cpu()].mean(1), standardize(down_metric)


def bias_compensation(weight: Tensor, mean: Tensor, keep: Tensor) -> Tensor:
    """FLAP's baseline bias W[:, pruned] @ mean[pruned] -> [out], in weight's dtype, at least float32
    (a bfloat16 weight's bias is rounded once, when the shrunk layer stores it, not here too).

    Removing input channels removes their average contribution to the output too; adding it back
    as a constant keeps the layer's mean output on calibration data equal to the dense layer's.
    Add it to any existing bias.
    """
    require(weight.dim() == 2, f"bias_compensation: weight must be [out, C], got {tuple(weight.shape)}")
    n_in = weight.shape[1]
    require(mean.numel() == n_in, f"bias_compensation: mean has {mean.numel()} channels, weight has {n_in}")
    pruned = torch.ones(n_in, dtype=torch.bool, device=weight.device)
    pruned[keep.to(weight.device)] = False
    w = weight.detach()[:, pruned].to(torch.float64)
    m = mean.detach().reshape(-1).to(device=weight.device, dtype=torch.float64)[pruned]
    return (w @ m).to(torch.promote_types(weight.dtype, torch.float32))


def flap_bias(weight: Tensor, stats: InputStats, keep_columns: Tensor) -> Tensor:
    """`bias_compensation` from streamed input statistics (`base.MetricPruner`'s compensation hook)."""
    return bias_compensation(weight, stats.mean.to(weight.device), keep_columns.to(weight.device))


def flap_metric(weight: Tensor, stats: InputStats | None) -> Tensor:
    """`fluctuation_metric` from streamed input statistics."""
    return fluctuation_metric(weight, stats.variance)


def flap_pruner(n_channels: int, where: str) -> MetricPruner:
    """FLAP on one Linear input: fluctuation metric, top units, bias compensation (also F-FANG's heads)."""
    return MetricPruner("flap", n_channels, flap_metric, where, stats=True, compensate=flap_bias)


class Flap(PruningMethod):
    """FLAP: fluctuation metric on heads and neurons, bias compensation; `auto` allocation = the global
    AL-AM search on the dense capture (`flap_search`, planned by `fang.methods.plan`)."""

    def attention(self, ctx: LayerContext) -> MetricPruner:
        return flap_pruner(ctx.layer.self_attn.o_proj.in_features, ctx.where("o_proj"))

    def ffn(self, ctx: LayerContext) -> MetricPruner:
        return flap_pruner(ctx.n_ffn, ctx.where("down_proj"))
