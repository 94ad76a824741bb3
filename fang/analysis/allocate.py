"""Adaptive block-wise sparsity (paper: "Adaptive Sparsity Allocation", Eq. 8).

Functional complexity FC_l = 1 - E_t cos(x_t^l, x_t^{l+1}) measures how much block l changes
its tokens. Blocks that change more are treated as more critical and get less sparsity, with
the per-block values kept within [lo * sp, hi * sp] around the target sp (paper: [0.5, 1.5]).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from torch import Tensor

from ..core.atomic import atomic_file, read_json, write_json
from ..core.errors import FangError, require

ALLOCATE_MODES = ("fc", "uniform", "taylor")


# ------------------------------------------------------------------- functional complexity


def _token_cosines(block_in: Tensor, block_out: Tensor) -> Tensor:
    require(
        block_in.shape == block_out.shape,
        f"block input and output shapes differ: {tuple(block_in.shape)} vs {tuple(block_out.shape)}",
    )
    require(block_in.dim() >= 1 and block_in.shape[-1] > 0, f"block features need a hidden dim, got shape {tuple(block_in.shape)}")
    d = block_in.shape[-1]
    # float64: fp16 hidden states with norms in the hundreds overflow/round badly in a dot product
    a = block_in.reshape(-1, d).double()
    b = block_out.reshape(-1, d).double()
    dot = (a * b).sum(dim=1)
    norms = a.norm(dim=1) * b.norm(dim=1)
    # a zero vector has no direction: count it as cos = 0 rather than dividing by zero
    return dot / norms.clamp(min=1e-30)


class ComplexityStats:
    """Streaming FC of one block: feed (input, output) chunks of shape [..., d], read `.value`."""

    def __init__(self) -> None:
        self.cos_sum = 0.0
        self.count = 0

    def add_batch(self, block_in: Tensor, block_out: Tensor) -> None:
        cos = _token_cosines(block_in, block_out)
        self.cos_sum += float(cos.sum())
        self.count += cos.numel()

    @property
    def value(self) -> float:
        require(self.count > 0, "functional complexity of a block needs at least one token")
        return 1.0 - self.cos_sum / self.count


def functional_complexity(block_in: Tensor, block_out: Tensor) -> float:
    """FC = 1 - mean over tokens of cos(x_in, x_out) (Eq. 8); in [0, 2]. Shapes [..., d]."""
    stats = ComplexityStats()
    stats.add_batch(block_in, block_out)
    return stats.value


# --------------------------------------------------------------------------- allocation


def block_sparsity(
    scores: Sequence[float],
    target: float,
    params_per_block: Sequence[int] | None = None,
    lo: float = 0.5,
    hi: float = 1.5,
    max_sparsity: float = 0.95,
) -> list[float]:
    """Per-block sparsities from block scores (higher score = more critical = less sparsity).

    `scores` are FC_l for the paper's allocation ("fc") or a sensitivity per block ("taylor").
    With s_min/s_max the extreme scores and sp the target:

    1. Linear map (sp_l proportional to 1 - FC_l, as in the paper/OWL): the most critical block
       (s_max, i.e. the minimum of 1 - FC) goes to lo*sp, the least critical (s_min, maximum of
       1 - FC) to hi*sp:  base_l = sp * (hi - (hi - lo) * (s_l - s_min) / (s_max - s_min)).
    2. Offset: sp_l = clip(base_l + c, L, U) with L = max(lo*sp, 0), U = min(hi*sp, max_sparsity),
       and the single offset c chosen so that the parameter-weighted mean of sp_l equals sp
       exactly. The weighted mean is continuous and piecewise linear in c, going from L to U,
       so c is found exactly from its breakpoints; a solution exists whenever sp <= max_sparsity.

    Without clipping this is exactly the official FANG code (range of width (hi-lo)*sp, shifted
    to mean sp); the clip keeps every block inside the paper's [lo*sp, hi*sp] band and below
    max_sparsity. Ordering is preserved: a higher score never gets a higher sparsity.
    Constant scores give the uniform allocation [sp] * n_blocks.
    """
    s = np.asarray(list(scores), dtype=np.float64)
    n = s.size
    require(n > 0, "no block scores given: need one score per decoder block")
    require(bool(np.isfinite(s).all()), f"block scores must be finite, got {s.tolist()}")
    require(0.0 <= target < 1.0, f"target sparsity {target} must be in [0, 1)")
    require(0.0 <= lo <= 1.0 <= hi, f"sparsity band [lo={lo}, hi={hi}] must satisfy 0 <= lo <= 1 <= hi")
    require(0.0 < max_sparsity < 1.0, f"max_sparsity={max_sparsity} must be in (0, 1)")
    require(
        target <= max_sparsity,
        f"target sparsity {target} exceeds max_sparsity={max_sparsity}: no allocation can reach it",
    )
    if params_per_block is None:
        w = np.ones(n)
    else:
        w = np.asarray(list(params_per_block), dtype=np.float64)
        require(w.size == n, f"params_per_block has {w.size} entries for {n} blocks")
        require(bool((w > 0).all()), "params_per_block must be positive")
    w = w / w.sum()

    span = float(s.max() - s.min())
    if target == 0.0 or span <= 1e-12 * max(float(np.abs(s).max()), 1e-300):
        return [float(target)] * n

    base = target * (hi - (hi - lo) * (s - s.min()) / span)
    low, up = max(lo * target, 0.0), min(hi * target, max_sparsity)

    def weighted_mean(c: float) -> float:
        return float(w @ np.clip(base + c, low, up))

    # f(c) is linear between consecutive breakpoints, where some block enters/leaves the band
    breaks = np.unique(np.concatenate([low - base, up - base]))
    values = np.array([weighted_mean(c) for c in breaks])
    # values[0] == low <= target <= up == values[-1]; find the segment containing target
    i = int(np.searchsorted(values, target, side="left"))
    if i == 0:
        c = float(breaks[0])
    elif i >= breaks.size:
        c = float(breaks[-1])
    else:
        c0, c1, v0, v1 = breaks[i - 1], breaks[i], values[i - 1], values[i]
        c = float(c0 + (target - v0) * (c1 - c0) / (v1 - v0)) if v1 > v0 else float(c0)
    # low >= 0 and up <= max_sparsity, so this clip is also the final [0, max_sparsity] clip
    result = np.clip(base + c, low, up)
    if not math.isclose(float(w @ result), target, rel_tol=1e-9, abs_tol=1e-12):
        raise FangError(f"sparsity allocation missed the target {target}: got {float(w @ result)}")
    return [float(v) for v in result]


def allocate_sparsity(
    mode: str,
    scores: Sequence[float] | None,
    target: float,
    params_per_block: Sequence[int] | None = None,
    n_blocks: int | None = None,
    lo: float = 0.5,
    hi: float = 1.5,
    max_sparsity: float = 0.95,
) -> list[float]:
    """Dispatch on allocate.mode: "uniform" -> [target] * n_blocks; "fc"/"taylor" ->
    `block_sparsity` on the given scores (FC values, or per-block sensitivities)."""
    require(mode in ALLOCATE_MODES, f"unknown allocation mode {mode!r}: use one of {', '.join(ALLOCATE_MODES)}")
    if mode == "uniform":
        count = n_blocks if n_blocks is not None else (len(list(scores)) if scores is not None else None)
        require(count is not None and count > 0, "uniform allocation needs the number of blocks")
        require(0.0 <= target <= max_sparsity, f"target sparsity {target} must be in [0, max_sparsity={max_sparsity}]")
        return [float(target)] * count
    require(scores is not None, f"allocation mode {mode!r} needs one score per block")
    return block_sparsity(scores, target, params_per_block, lo=lo, hi=hi, max_sparsity=max_sparsity)


def write_allocation(art, mode: str, max_sparsity: float, fc: list[float], taylor: list[float],
                     targets: Sequence[float]) -> dict[str, list[float]]:
    """Write allocate.json, block_sparsity.json and plots/block_sparsity.csv of one calibration set
    (`paths.CalibrationArtifacts`); returns the per-block sparsity for each target."""
    # both block scores are kept, so any method can use either (prune.allocation: fc | taylor)
    scores = taylor if mode == "taylor" else fc
    # allocate.json holds only what does not depend on the target sparsity, so pruning stages that
    # read it are not rerun when a sparsity is added to or changed in the sweep
    write_json(art.allocate, {"mode": mode, "max_sparsity": max_sparsity, "functional_complexity": fc,
                              "taylor_sensitivity": taylor, "scores": scores})
    # every dense block has the same size, so the parameter-weighted mean is the plain mean
    by_target = {str(t): allocate_sparsity(mode, scores, t, n_blocks=len(fc), max_sparsity=max_sparsity) for t in targets}
    write_json(art.block_sparsity, {
        "mode": mode,
        "note": "per-block sparsity for heads and FFN neurons (the same value), for each sweep target",
        "by_target": {t: {"attn_sparsity": v, "ffn_sparsity": v, "mean_sparsity": sum(v) / len(v)} for t, v in by_target.items()},
    })
    with atomic_file(art.plots / "block_sparsity.csv") as fh:
        w = csv.writer(fh)
        w.writerow(["layer", "functional_complexity", *[f"sparsity_at_{t}" for t in by_target]])
        w.writerows([li, round(f, 6), *[round(v[li], 6) for v in by_target.values()]] for li, f in enumerate(fc))
    return by_target


@dataclass(frozen=True)
class AllocationScores:
    """What one calibration set's allocate.json holds, none of it depending on the target sparsity: the block
    scores of every allocation and the cap. `fang.methods.plan.allocated_sparsity` turns them into each block's
    sparsity at a target (fc, taylor, or FANG's own, which follows `mode`)."""

    mode: str  # allocate.mode: the allocation FANG's own ("asa") follows, whose block scores are `scores`
    scores: list[float]
    functional_complexity: list[float]
    taylor_sensitivity: list[float] | None
    max_sparsity: float
    source: str = "allocate.json"  # where they were read (named in errors)


def read_allocation_scores(path) -> AllocationScores:
    """allocate.json (`write_allocation`) as `AllocationScores`."""
    alloc = read_json(path)
    return AllocationScores(alloc["mode"], alloc["scores"], alloc["functional_complexity"],
                            alloc.get("taylor_sensitivity"), alloc["max_sparsity"], str(path))
