"""Magnitude: ||W[:, j]||_2 of each input column, no calibration data, no compensation."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.errors import require
from .base import LayerContext, MetricPruner, PruningMethod


def magnitude_metric(weight: Tensor) -> Tensor:
    """Magnitude score of input channel j: ||W[:, j]||_2 -> [C] float64."""
    require(weight.dim() == 2, f"magnitude_metric: weight must be [out, C], got {tuple(weight.shape)}")
    return torch.linalg.vector_norm(weight.detach(), dim=0, dtype=torch.float64)


def magnitude_pruner(n_channels: int, where: str) -> MetricPruner:
    return MetricPruner("magnitude", n_channels, lambda w, _stats: magnitude_metric(w), where, stats=False)


class Magnitude(PruningMethod):
    needs_data = False  # no activations: the driver runs no forward pass at all

    def attention(self, ctx: LayerContext) -> MetricPruner:
        return magnitude_pruner(ctx.layer.self_attn.o_proj.in_features, ctx.where("o_proj"))

    def ffn(self, ctx: LayerContext) -> MetricPruner:
        return magnitude_pruner(ctx.n_ffn, ctx.where("down_proj"))
