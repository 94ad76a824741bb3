"""Streaming per-channel statistics of a Linear layer's input, the data metric methods score with.

Kept in float64: per-channel variances of activations with large means (LLM outliers) lose most of
their digits in float32 when accumulated over hundreds of thousands of tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.errors import FangError, require


class InputStats:
    """Streaming per-channel mean and population variance of a Linear layer's input.

    Batches are merged with Chan et al.'s parallel update (batch mean and squared deviations, then
    a correction for the shift between means) instead of raw sums of squares, which would cancel
    catastrophically for channels whose mean is large compared to their spread.

    Optional per-token weights give weighted statistics: mean = sum(w x) / sum(w) and
    variance = sum(w (x - mean)^2) / sum(w). Unweighted is the same with every w = 1.
    """

    def __init__(self) -> None:
        self.count = 0  # tokens seen (whatever their weights)
        self.weight_sum = 0.0  # sum of token weights; equals `count` when unweighted
        self._mean: Tensor | None = None  # [C] float64
        self._m2: Tensor | None = None  # [C] float64: weighted sum of squared deviations from the mean

    @property
    def n_channels(self) -> int | None:
        return None if self._mean is None else self._mean.numel()

    def add_batch(self, x: Tensor, weights: Tensor | None = None) -> None:
        """Accumulate x of shape [..., C]; `weights` (shape x.shape[:-1], >= 0) weight each token."""
        require(
            x.dim() >= 1 and x.shape[-1] > 0,
            f"InputStats.add_batch: expected x of shape [..., C], got {tuple(x.shape)}",
        )
        n_channels = x.shape[-1]
        if self._mean is not None and n_channels != self._mean.numel():
            raise FangError(f"InputStats: got {n_channels} channels, earlier batches had {self._mean.numel()}")
        if weights is not None:
            if tuple(weights.shape) != tuple(x.shape[:-1]):
                raise FangError(
                    f"InputStats: weights must have the leading shape of x {tuple(x.shape[:-1])}, "
                    f"got {tuple(weights.shape)}"
                )
            w = weights.detach().reshape(-1).to(device=x.device, dtype=torch.float64)
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise FangError("InputStats: token weights must be finite and nonnegative")
        x = x.detach().reshape(-1, n_channels).to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        self.count += n
        if weights is None:
            w_sum = float(n)
            batch_mean = x.mean(0)
            batch_m2 = (x - batch_mean).square_().sum(0)
        else:
            w_sum = float(w.sum())
            if w_sum == 0.0:
                return  # tokens with zero weight contribute nothing to merge
            batch_mean = (w @ x) / w_sum
            batch_m2 = w @ (x - batch_mean).square_()
        self._merge(w_sum, batch_mean, batch_m2)

    def merge(self, other: "InputStats") -> None:
        """Fold another accumulator's statistics into this one (e.g. from a different data shard)."""
        if other._mean is None:
            self.count += other.count
            return
        if self._mean is not None and other._mean.numel() != self._mean.numel():
            raise FangError(f"InputStats.merge: {other._mean.numel()} channels vs {self._mean.numel()}")
        self.count += other.count
        self._merge(other.weight_sum, other._mean, other._m2)

    def _merge(self, w_b: float, mean_b: Tensor, m2_b: Tensor) -> None:
        if self._mean is None or self.weight_sum == 0.0:
            self._mean, self._m2, self.weight_sum = mean_b.clone(), m2_b.clone(), w_b
            return
        mean_b = mean_b.to(self._mean.device)
        m2_b = m2_b.to(self._mean.device)
        w_a = self.weight_sum
        total = w_a + w_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (w_b / total)
        self._m2 = self._m2 + m2_b + delta.square() * (w_a * w_b / total)
        self.weight_sum = total

    def _require_data(self) -> None:
        if self._mean is None or self.weight_sum == 0.0:
            raise FangError("InputStats: no (nonzero-weight) tokens were added; run calibration data through first")

    @property
    def mean(self) -> Tensor:
        self._require_data()
        return self._mean

    @property
    def variance(self) -> Tensor:
        """Population variance (divide by the total weight, not weight - 1), as FLAP uses."""
        self._require_data()
        return self._m2 / self.weight_sum

    @property
    def sum(self) -> Tensor:
        self._require_data()
        return self._mean * self.weight_sum

    @property
    def sum_sq(self) -> Tensor:
        """Weighted sum of x^2 per channel (the squared input norm used by Wanda-style metrics)."""
        self._require_data()
        return self._m2 + self._mean.square() * self.weight_sum
