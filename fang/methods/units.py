"""What a structured pruner removes and the knobs it takes: `AttentionUnits` (heads, KV groups or query
slots of a possibly GQA model), `UnitScores` (what a method's global search ranks) and `PruneOptions` (the
method settings of `prune.*`).

Plain data shared by the planning (`fang.methods.plan`), the method interface (`fang.methods.base`) and
the sequential pass (`fang.methods.driver`); it imports none of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..analysis.cluster import RELEVANCE_MODES
from ..core.choices import ALLOCATIONS, COMPENSATIONS, OWN_ALLOCATIONS
from ..core.errors import require
from ..core.params import check_align
from ..model.modeling import attention_geometry


def _groups(head_scores: Tensor, n_kv_heads: int) -> Tensor:
    n = head_scores.numel()
    require(n_kv_heads > 0 and n % n_kv_heads == 0, f"{n} query heads do not split into {n_kv_heads} KV groups")
    # query head h uses KV head h // g, so row kv of this view is that KV head's group of queries
    return head_scores.reshape(n_kv_heads, n // n_kv_heads)


def group_scores(head_scores: Tensor, n_kv_heads: int) -> Tensor:
    """GQA: score of each KV group = mean over the query heads sharing that KV head -> [n_kv_heads]."""
    return _groups(head_scores, n_kv_heads).mean(1)


def slot_scores(head_scores: Tensor, n_kv_heads: int) -> Tensor:
    """GQA: score of query slot s = mean over head s of every KV group -> [queries_per_kv]."""
    return _groups(head_scores, n_kv_heads).mean(0)


@dataclass
class AttentionUnits:
    """How heads are removed on a (possibly GQA) model: whole KV groups, or the same query slot in every group."""

    scheme: str  # "kv_group" or "query_slot"
    n_heads: int
    n_kv: int
    head_dim: int
    hidden: int

    @property
    def per_kv(self) -> int:
        return self.n_heads // self.n_kv

    @property
    def count(self) -> int:
        return self.n_kv if self.scheme == "kv_group" else self.per_kv

    @property
    def params(self) -> int:
        """Parameters one unit removes (q, k, v rows and o columns; biases ignored)."""
        if self.scheme == "kv_group":  # g query heads + their K and V head
            return (2 * self.per_kv + 2) * self.head_dim * self.hidden
        return 2 * self.n_kv * self.head_dim * self.hidden  # one query head per group: q rows + o columns

    @property
    def neuron_params(self) -> int:
        """Parameters one FFN neuron removes (its gate and up rows and its down column)."""
        return 3 * self.hidden

    def unit_fraction(self, dense_block_params: int) -> float:
        """The largest structure removed at once (an attention unit or a neuron) as a fraction of the dense
        block parameters: the granularity any sparsity target is met within."""
        return max(self.params, self.neuron_params) / max(dense_block_params, 1)

    def scores(self, head_scores: Tensor) -> Tensor:
        if self.scheme == "kv_group":
            return group_scores(head_scores, self.n_kv)
        return slot_scores(head_scores, self.n_kv)

    def unit_heads(self) -> Tensor:
        """[count, heads per unit]: the query heads each unit removes (query head h reads KV head h // g)."""
        g = self.per_kv
        if self.scheme == "kv_group":
            return torch.arange(self.n_kv)[:, None] * g + torch.arange(g)[None, :]
        return torch.arange(g)[:, None] + torch.arange(self.n_kv)[None, :] * g

    def unit_columns(self) -> Tensor:
        """[count, width]: the o_proj input columns of each unit (head h owns columns h*head_dim...)."""
        heads = self.unit_heads()
        cols = heads[:, :, None] * self.head_dim + torch.arange(self.head_dim)
        return cols.reshape(heads.shape[0], -1)

    def keep_indices(self, keep_units: Tensor) -> tuple[Tensor, Tensor]:
        """(kept KV heads, kept query slots) for shrink_attention."""
        if self.scheme == "kv_group":
            return keep_units, torch.arange(self.per_kv)
        return torch.arange(self.n_kv), keep_units


@dataclass
class UnitScores:
    """Scores of every block's units that a global search ranks (`fang.methods.plan.global_search`), higher = more
    worth keeping: `attention` [n_units] per block (None: no attention unit is scored, the search keeps them all)
    and `ffn` [n_ffn] per block."""

    attention: list[Tensor] | None
    ffn: list[Tensor]


def attention_units(config, scheme: str) -> AttentionUnits:
    require(scheme in ("kv_group", "query_slot"), f"prune.gqa={scheme!r}: use 'kv_group' or 'query_slot'")
    n_heads, n_kv, head_dim = attention_geometry(config)
    if n_kv == n_heads:
        scheme = "kv_group"  # MHA: a "slot" would be all heads at once; both schemes mean plain head pruning
    return AttentionUnits(scheme, n_heads, n_kv, head_dim, config.hidden_size)


@dataclass
class PruneOptions:
    """Method settings beyond (method, sparsity, gqa): the FANG and OBC knobs of `PruneParams`."""

    tau: float = 9.0  # FANG softmax temperature of Eq. 6
    damp: float = 0.01  # OBC Hessian dampening, fraction of its mean diagonal
    shared_group: bool = True  # FANG: never prune the shared neuron group
    function_aware: bool = True  # FANG: prune per functional group with reweighted statistics
    reweighting: str = "ours"  # FANG token-cluster weights (cluster.RELEVANCE_MODES)
    # per-block sparsity (from `prune.allocation`: uniform, fc or taylor, e.g. "OBC + ASA", Table 9); None = the
    # plan computes it (fang.methods.plan.allocated_sparsity), or for FANG its own allocation (FangInputs.allocation)
    block_sparsity: Sequence[float] | None = None
    allocation: str = "auto"  # how keep counts per block are chosen (ALLOCATIONS); "flap_search" = FLAP's AL-AM
    compensation: str = "group"  # O-FANG: refit removed neurons per group (Eq. 7), from the whole layer's kept columns, or those towards the dense output
    align: int = 1  # every pruned block keeps a multiple of this many FFN neurons (plan.align_widths); 1 = any width

    @classmethod
    def from_params(cls, p, variant=None) -> "PruneOptions":
        """From a `fang.core.params.PruneParams`; a `fang.core.choices.Variant` sets the allocation and
        compensation (its parts not named already hold the block's)."""
        allocation, compensation = (p.allocation, p.compensation) if variant is None else (
            variant.allocation, variant.compensation)
        return cls(p.tau, p.damp, p.shared_group, p.function_aware, p.reweighting, None, allocation, compensation,
                   p.align)

    def validate(self) -> None:
        number = isinstance(self.tau, (int, float)) and not isinstance(self.tau, bool)
        require(
            number and math.isfinite(self.tau) and self.tau > 0,
            f"prune.tau={self.tau} must be positive (softmax temperature of Eq. 6)",
        )
        require(
            isinstance(self.damp, (int, float)) and math.isfinite(self.damp) and self.damp >= 0,
            f"prune.damp={self.damp} must be >= 0",
        )
        require(
            self.reweighting in RELEVANCE_MODES,
            f"prune.reweighting={self.reweighting!r}: use one of {', '.join(RELEVANCE_MODES)}",
        )
        require(
            self.allocation in ALLOCATIONS + OWN_ALLOCATIONS,
            f"prune.allocation={self.allocation!r}: use one of {', '.join(ALLOCATIONS + OWN_ALLOCATIONS)}",
        )
        require(
            self.compensation in COMPENSATIONS,
            f"prune.compensation={self.compensation!r}: use one of {', '.join(COMPENSATIONS)}",
        )
        check_align(self.align)

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["align"] == 1:  # the default leaves the report as it was before prune.align existed (same bytes, same DVC hash)
            del d["align"]
        if d["block_sparsity"] is not None:
            d["block_sparsity"] = [float(s) for s in d["block_sparsity"]]
        return d
