"""Ungrouped channel selection for one Linear input: the baselines FANG is compared with.

A `ChannelPruner` streams the calibration inputs of `o_proj` or `down_proj` (whatever statistic
its method needs) and then chooses which units of input columns to keep:

- "flap":      fluctuation metric var_j * ||W[:, j]||^2, plus FLAP's bias compensation;
- "wanda_sp":  structured Wanda as adapted in the FLAP paper, sum_i |W_ij| * ||X_j||_2, no compensation;
- "magnitude": ||W[:, j]||_2, no calibration data, no compensation;
- "obc" / "obc_iter": structured OBC, one-shot (the paper's variant) or greedy (see `fang.obc`).

A unit is a row of column indices: one column for FFN neurons, head_dim columns for a head, or all
columns of the heads a GQA unit removes together. Metric methods score a unit by the mean of its
columns' scores (what FLAP does for heads); OBC scores the whole block jointly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import flap
from .errors import FangError, require
from .obc import HessianAccumulator, inverse_hessian, obc_prune, obc_prune_iterative

KINDS = ("flap", "wanda_sp", "magnitude", "obc", "obc_iter")


def wanda_sp_metric(weight: Tensor, input_sq_sum: Tensor) -> Tensor:
    """Structured Wanda score of input channel j: sum_i |W_ij| * ||X_j||_2 -> [C] float64.

    `input_sq_sum` is sum over calibration tokens of x_j^2 (`flap.InputStats.sum_sq`).
    """
    require(weight.dim() == 2, f"wanda_sp_metric: weight must be [out, C], got {tuple(weight.shape)}")
    require(
        input_sq_sum.numel() == weight.shape[1],
        f"wanda_sp_metric: {input_sq_sum.numel()} input norms for {weight.shape[1]} input channels",
    )
    w = weight.detach().to(torch.float64)
    norms = input_sq_sum.detach().reshape(-1).to(device=w.device, dtype=torch.float64).clamp(min=0).sqrt()
    return w.abs().sum(0) * norms


def magnitude_metric(weight: Tensor) -> Tensor:
    """Magnitude score of input channel j: ||W[:, j]||_2 -> [C] float64."""
    require(weight.dim() == 2, f"magnitude_metric: weight must be [out, C], got {tuple(weight.shape)}")
    return torch.linalg.vector_norm(weight.detach(), dim=0, dtype=torch.float64)


def unit_scores(channel_scores: Tensor, units: Tensor) -> Tensor:
    """Mean channel score over each unit's columns: [n_units] (= FLAP's head / GQA-group averages)."""
    return channel_scores[units.to(channel_scores.device)].mean(1)


@dataclass
class Selection:
    """What to keep of one Linear input, and how to rewrite it."""

    keep: Tensor  # kept unit ids, ascending (long, CPU)
    weight: Tensor | None = None  # compensated full-width weight [out, in] (OBC); None = unchanged
    bias: Tensor | None = None  # extra output bias to add (FLAP); None = no compensation
    info: dict = field(default_factory=dict)


class ChannelPruner:
    """Calibration statistics of one Linear input, then the choice of units to keep (one layer, one method)."""

    def __init__(
        self, kind: str, n_channels: int, damp: float = 0.01, where: str = "layer", device: torch.device | str = "cpu"
    ) -> None:
        require(kind in KINDS, f"unknown channel pruning kind {kind!r}; available: {', '.join(KINDS)}")
        self.kind, self.n_channels, self.damp, self.where = kind, n_channels, damp, where
        self.stats = flap.InputStats() if kind in ("flap", "wanda_sp") else None
        self.hessian = HessianAccumulator(n_channels, device) if kind in ("obc", "obc_iter") else None

    @property
    def needs_data(self) -> bool:
        return self.kind != "magnitude"

    def add_batch(self, x: Tensor) -> None:
        if self.stats is not None:
            self.stats.add_batch(x)
        if self.hessian is not None:
            self.hessian.add_batch(x)

    def select(self, weight: Tensor, n_keep: int, units: Tensor | None = None) -> Selection:
        """Keep `n_keep` units (rows of column ids; None = single columns) of `weight` [out, C]."""
        require(
            weight.shape[1] == self.n_channels,
            f"{self.where}: weight has {weight.shape[1]} inputs, the statistics {self.n_channels}",
        )
        units = torch.arange(self.n_channels).reshape(-1, 1) if units is None else units.cpu()
        n_units = units.shape[0]
        require(0 < n_keep <= n_units, f"{self.where}: cannot keep {n_keep} of {n_units} units")
        w = weight.detach()
        if self.kind in ("obc", "obc_iter"):
            if n_keep == n_units:  # nothing to remove: no Hessian to invert (FLAP still adds its zero bias)
                return Selection(torch.arange(n_units))
            hinv = inverse_hessian(self.hessian.hessian, self.damp, self.where)
            blocks = None if units.shape[1] == 1 and torch.equal(units[:, 0], torch.arange(self.n_channels)) else units
            prune_fn = obc_prune if self.kind == "obc" else obc_prune_iterative
            keep, new_w = prune_fn(w, hinv, n_units - n_keep, blocks, where=self.where)
            return Selection(keep.cpu(), weight=new_w)
        if self.kind == "flap":
            metric = flap.fluctuation_metric(w, self.stats.variance)
        elif self.kind == "wanda_sp":
            metric = wanda_sp_metric(w, self.stats.sum_sq)
        else:
            metric = magnitude_metric(w)
        scores = unit_scores(metric, units)
        if not bool(torch.isfinite(scores).all()):
            raise FangError(f"{self.where}: {self.kind} scores are not finite (NaN/Inf calibration activations?)")
        keep = flap.select_top(scores, n_keep).cpu()
        bias = None
        if self.kind == "flap":
            cols = units[keep].reshape(-1)
            bias = flap.bias_compensation(w, self.stats.mean.to(w.device), cols.to(w.device))
        return Selection(keep, bias=bias)
