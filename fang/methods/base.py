"""The method interface: what one pruning method tells the sequential driver (`fang.methods.driver`).

A method is a thin class (`PruningMethod`) that wires plain tensor functions into the driver, as
llm-compressor's modifiers and SparseGPT's `SparseGPT` wrap theirs. Per decoder block the driver
asks it for two `UnitPruner`s, one for the input of `o_proj` (attention units: heads, KV groups or
query slots) and one for the input of `down_proj` (FFN neurons); streams the block's calibration
inputs into them (`add_batch`; `add_ffn_input` too when the method labels tokens by the MLP input,
as FANG does); asks each to `select` the units to keep; and shrinks the block accordingly. What
differs between methods is therefore only:

- what it reads beyond the model and the capture (`load_inputs`: its analysis artifacts);
- what statistics it streams per layer (`add_batch` of its pruners: means/variances, Hessians, none);
- how it scores and selects units (`select`, usually a per-channel metric and `select_top`);
- how it compensates (`Selection.bias`: FLAP's bias; `Selection.weight`: OBC's refit; neither);
- optionally the data its own allocation reads (`own_allocation`: FANG's block scores; `global_scores`: the
  unit scores SoBP's and ica_fn's global searches rank), which the plan (`fang.methods.plan`) turns into
  keep counts, and extra per-layer diagnostics.

`MetricPruner` covers every method that scores input channels by a metric and keeps the top units
(FLAP, Wanda-sp, magnitude and the ranked ICA mode are each a metric function plus one line).
A unit is a row of column indices: one column for FFN neurons, head_dim columns for a head, or all
columns of the heads a GQA unit removes together; a unit's score is the mean of its columns' scores
(what FLAP does for heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import torch
from torch import Tensor

from ..core.errors import FangError, require
from .stats import InputStats

if TYPE_CHECKING:
    from collections.abc import Sequence

    from torch import nn

    from ..analysis.allocate import AllocationScores
    from ..core.paths import CalibrationArtifacts
    from .units import AttentionUnits, PruneOptions, UnitScores


@dataclass
class Selection:
    """What to keep of one Linear input, and how to rewrite it."""

    keep: Tensor  # kept unit ids, ascending (long, CPU)
    weight: Tensor | None = None  # compensated full-width weight [out, in] (OBC); None = unchanged
    bias: Tensor | None = None  # extra output bias to add (FLAP); None = no compensation
    info: dict = field(default_factory=dict)


class UnitPruner(Protocol):
    """Calibration statistics of one Linear input of one block, then the choice of units to keep."""

    def add_batch(self, x: Tensor) -> None:
        """Stream one batch of the Linear's input [..., C]."""

    def select(self, weight: Tensor, n_keep: int, units: Tensor | None = None) -> Selection:
        """Keep `n_keep` units (rows of column ids; None = single columns) of `weight` [out, C]."""


@dataclass
class LayerContext:
    """One block as the driver hands it to a method."""

    index: int
    layer: "nn.Module"
    units: "AttentionUnits"
    options: "PruneOptions"
    device: torch.device
    keep_attn: int  # attention units this block keeps
    keep_mlp: int  # FFN neurons this block keeps
    entry: dict  # the block's line of the prune report; a method may add diagnostics

    @property
    def n_ffn(self) -> int:
        return self.layer.mlp.down_proj.in_features

    def where(self, sublayer: str) -> str:
        return f"layer {self.index} {sublayer}"


class PruningMethod:
    """Base class of a registered method (`fang.core.registry`): override what differs.

    `inputs` is what `load_inputs` read (the method's analysis artifacts), or None.
    """

    needs_data: ClassVar[bool] = True  # False: no calibration forward pass at all (magnitude)
    needs_ffn_input: ClassVar[bool] = False  # True: the FFN pruner also sees the MLP input (`add_ffn_input`)
    # prune.align may move the FFN widths its own global search chose (ica_fn: it keeps each block's top-scored
    # neurons at whatever width it is given); False: the plan refuses an align that would
    aligns_own_search: ClassVar[bool] = False

    def __init__(self, name: str, options: "PruneOptions", inputs: Any = None) -> None:
        self.name, self.options, self.inputs = name, options, inputs

    @classmethod
    def load_inputs(cls, art: "CalibrationArtifacts", params_path: str = "params.yaml",
                    options: "PruneOptions | None" = None) -> Any:
        """Read the method's analysis artifacts for one calibration set (None: it reads none), whatever the target
        sparsity. `options`, the settings it will prune with, when what it reads depends on them (o_fang+dense:
        the token ids)."""
        return None

    def check(self, model: "nn.Module") -> None:
        """Validate `inputs` against the model before anything is pruned (FangError naming the problem)."""

    def own_allocation(self) -> "AllocationScores | Sequence[float] | None":
        """What its own per-block allocation follows (FANG's "asa"): the calibration set's block scores, which the
        plan turns into each block's sparsity at the target (`plan.allocated_sparsity`), or a per-block sparsity
        given as is; None: it has none."""
        return None

    def global_scores(self, model: "nn.Module", units: "AttentionUnits") -> "UnitScores | None":
        """The scores of every block's units that its own global search ranks (the registry allocation it names,
        e.g. SoBP's first-order loss changes), computed when the plan runs that search (`plan.global_search`)."""
        return None

    def ffn_floors(self, n_ffns: list[int]) -> list[int] | None:
        """The fewest FFN neurons each block can keep with this method (None: one), so that `prune.align`
        rounds to a width the method can reach (FANG never removes its shared group)."""
        return None

    def attention(self, ctx: LayerContext) -> UnitPruner:
        raise NotImplementedError

    def ffn(self, ctx: LayerContext) -> UnitPruner:
        raise NotImplementedError

    def finish_layer(self, ctx: LayerContext, ffn: Selection) -> None:
        """Add method-specific diagnostics to `ctx.entry` after the block was pruned."""


def select_top(scores: Tensor, n_keep: int) -> Tensor:
    """Ascending indices of the `n_keep` highest scores; ties go to the lower index."""
    scores = scores.detach().reshape(-1)
    require(0 <= n_keep <= scores.numel(), f"select_top: cannot keep {n_keep} of {scores.numel()} units")
    require(not bool(torch.isnan(scores).any()), "select_top: scores contain NaN")
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:n_keep]).values


def unit_scores(channel_scores: Tensor, units: Tensor) -> Tensor:
    """Mean channel score over each unit's columns: [n_units] (= FLAP's head / GQA-group averages)."""
    return channel_scores[units.to(channel_scores.device)].mean(1)


def default_units(n_channels: int, units: Tensor | None) -> Tensor:
    return torch.arange(n_channels).reshape(-1, 1) if units is None else units.cpu()


def checked_units(weight: Tensor, n_channels: int, n_keep: int, units: Tensor | None, where: str) -> Tensor:
    """The units of a `UnitPruner.select` call, after checking the weight matches the streamed
    statistics and that `n_keep` is a possible count."""
    require(weight.shape[1] == n_channels, f"{where}: weight has {weight.shape[1]} inputs, the statistics {n_channels}")
    units = default_units(n_channels, units)
    require(0 < n_keep <= units.shape[0], f"{where}: cannot keep {n_keep} of {units.shape[0]} units")
    return units


# metric(weight [out, C], streamed input statistics or None) -> per-channel score [C]
ChannelMetric = Callable[[Tensor, "InputStats | None"], Tensor]
# compensation(weight [out, C], streamed input statistics, kept column ids) -> extra output bias [out]
BiasCompensation = Callable[[Tensor, InputStats, Tensor], Tensor]


class MetricPruner:
    """Keep the units with the highest mean channel metric; optionally add a compensating bias.

    `stats`: stream the input's mean and variance (`InputStats`); a metric that needs no data
    (magnitude, a precomputed score) passes False and adds no forward-pass cost.
    `compensate`: e.g. FLAP's bias (`flap.flap_bias`), computed from the kept columns.
    """

    def __init__(self, name: str, n_channels: int, metric: ChannelMetric, where: str = "layer", stats: bool = True,
                 compensate: BiasCompensation | None = None) -> None:
        self.name, self.n_channels, self.metric, self.where = name, n_channels, metric, where
        self.stats = InputStats() if stats else None
        self.compensate = compensate

    def add_batch(self, x: Tensor) -> None:
        if self.stats is not None:
            self.stats.add_batch(x)

    def select(self, weight: Tensor, n_keep: int, units: Tensor | None = None) -> Selection:
        units = checked_units(weight, self.n_channels, n_keep, units, self.where)
        n_units = units.shape[0]
        w = weight.detach()
        scores = unit_scores(self.metric(w, self.stats), units)
        if not bool(torch.isfinite(scores).all()):
            raise FangError(f"{self.where}: {self.name} scores are not finite (NaN/Inf calibration activations?)")
        keep = select_top(scores, n_keep).cpu()
        bias = None
        if self.compensate is not None:
            bias = self.compensate(w, self.stats, units[keep].reshape(-1))
        return Selection(keep, bias=bias)


class KeepAll:
    """A sublayer the method leaves untouched: keeps every unit, no statistics, no compensation."""

    def __init__(self, where: str = "layer") -> None:
        self.where = where

    def add_batch(self, x: Tensor) -> None:
        pass

    def select(self, weight: Tensor, n_keep: int, units: Tensor | None = None) -> Selection:
        n_units = weight.shape[1] if units is None else units.shape[0]
        require(n_keep == n_units, f"{self.where}: this method keeps every unit here, not {n_keep} of {n_units}")
        return Selection(torch.arange(n_units))
