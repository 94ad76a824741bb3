"""Wanda-sp: structured Wanda as adapted in the FLAP paper, sum_i |W_ij| * ||X_j||_2, no compensation."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.errors import require
from .base import LayerContext, MetricPruner, PruningMethod


def wanda_sp_metric(weight: Tensor, input_sq_sum: Tensor) -> Tensor:
    """Structured Wanda score of input channel j: sum_i |W_ij| * ||X_j||_2 -> [C] float64.

    `input_sq_sum` is sum over calibration tokens of x_j^2 (`InputStats.sum_sq`).
    """
    require(weight.dim() == 2, f"wanda_sp_metric: weight must be [out, C], got {tuple(weight.shape)}")
    require(
        input_sq_sum.numel() == weight.shape[1],
        f"wanda_sp_metric: {input_sq_sum.numel()} input norms for {weight.shape[1]} input channels",
    )
    w = weight.detach().to(torch.float64)
    norms = input_sq_sum.detach().reshape(-1).to(device=w.device, dtype=torch.float64).clamp(min=0).sqrt()
    return w.abs().sum(0) * norms


def wanda_sp_pruner(n_channels: int, where: str) -> MetricPruner:
    return MetricPruner("wanda_sp", n_channels, lambda w, stats: wanda_sp_metric(w, stats.sum_sq), where)


class WandaSp(PruningMethod):
    def attention(self, ctx: LayerContext) -> MetricPruner:
        return wanda_sp_pruner(ctx.layer.self_attn.o_proj.in_features, ctx.where("o_proj"))

    def ffn(self, ctx: LayerContext) -> MetricPruner:
        return wanda_sp_pruner(ctx.n_ffn, ctx.where("down_proj"))


