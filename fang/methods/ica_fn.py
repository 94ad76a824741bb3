"""ICA functional networks (seed 003) as pruning methods, from the maps of stage `ica` (artifacts/ica.zarr).

Two registry names, one per mode of the paper's method:

- `ica_fn` (faithful): keep the union of key neurons, |z| > T in any component for the act or the up
  column (`analysis.ica.key_neurons`), with one T for every prunable block found by bisection so that
  exactly the target number of FFN neurons goes (`plan.faithful_masks`; the paper hand-tunes T).
  The target is the sparsity as a fraction of the decoder-block parameters, removed from FFN
  neurons only (3 x hidden parameters each); blocks 0-2 and the last two stay dense; no head is
  pruned; FLAP-style bias compensation of down_proj (`flap.bias_compensation`) with the calibration
  mean its input has in the sequential pass. Its keep counts are its own: no allocation applies.
- `ica_fn_ranked`: score = max |z| over components and act/up columns (`analysis.ica.neuron_score`), the
  top neurons of each block under the allocation shared with the other methods (uniform by
  default, `+fc`/`+taylor`/`+flap_search`), heads and compensation as FLAP's, so it competes at
  equal parameter counts and differs from `flap+uniform` only in how it ranks FFN neurons.

A neuron is key at T exactly when its score exceeds T, so the faithful mode keeps the top neurons
of the score too: the two modes differ in where the neurons go (a global threshold with dense edges
against per-block counts) and in the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..analysis.ica import key_neurons, neuron_score, prunable_layers
from ..analysis.store import open_store
from ..core.errors import require
from ..core.paths import CalibrationArtifacts
from ..model.modeling import decoder_layers
from .base import KeepAll, LayerContext, MetricPruner, PruningMethod, Selection
from .flap import flap_bias, flap_pruner
from .stats import InputStats
from .units import UnitScores


MODES = ("faithful", "ranked")


def layer_decision(mode: str, layer: int, n_layers: int, maps: Tensor, threshold: float | None = None) -> Tensor:
    """Per-layer output of the method: `faithful` -> keep mask [n] (dense on edge layers),
    `ranked` -> neuron score [n] for the shared per-block allocation to select from."""
    require(mode in MODES, f"ica_fn mode {mode!r}: use {' or '.join(MODES)}")
    if mode == "ranked":
        return neuron_score(maps)
    require(threshold is not None, "ica_fn faithful: a threshold is needed (see plan.faithful_masks)")
    if layer not in prunable_layers(n_layers):
        return torch.ones(maps.shape[1] // 2, dtype=torch.bool)
    return key_neurons(maps, threshold)


@dataclass
class IcaInputs:
    """What the methods read of artifacts/ica.zarr: the ranked score of every FFN neuron [layers, n_ffn]."""

    neuron_score: Tensor

    def __post_init__(self) -> None:
        self.neuron_score = torch.as_tensor(self.neuron_score).double()

    def validate(self, model: nn.Module) -> None:
        layers = decoder_layers(model)
        n_ffns = {layer.mlp.down_proj.in_features for layer in layers}
        require(len(n_ffns) == 1, "ica_fn needs a dense model: the FFN widths differ between layers")
        shape, want = tuple(self.neuron_score.shape), (len(layers), n_ffns.pop())
        require(shape == want, f"ica.zarr neuron_score is {shape}, the model has {want} (layers, FFN neurons): "
                               "the ICA maps are of another model; rerun the ica stage")
        require(bool(torch.isfinite(self.neuron_score).all()), "ica.zarr neuron_score contains NaN or Inf")


def load_ica_inputs(art: CalibrationArtifacts) -> IcaInputs:
    return IcaInputs(open_store(art.ica, "ica", "ica")["neuron_score"][:])


def top_neurons(scores: Tensor, n_keep: int) -> Tensor:
    """Keep mask [n] of the `n_keep` highest `scores` (ties to the lower index)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.sort(scores, descending=True, stable=True).indices[:n_keep]] = True
    return keep


class MaskPruner:
    """Keep a fixed set of units (chosen before the block's statistics); optionally FLAP's bias."""

    def __init__(self, keep: Tensor, where: str, compensate: bool = True) -> None:
        self.keep, self.where = torch.nonzero(keep.cpu()).reshape(-1), where
        self.stats = InputStats() if compensate else None

    def add_batch(self, x: Tensor) -> None:
        if self.stats is not None:
            self.stats.add_batch(x)

    def select(self, weight: Tensor, n_keep: int, units: Tensor | None = None) -> Selection:
        require(len(self.keep) == n_keep, f"{self.where}: the mask keeps {len(self.keep)} units, the plan {n_keep}")
        w = weight.detach()
        bias = None if self.stats is None else flap_bias(w, self.stats, self.keep)
        return Selection(self.keep, bias=bias)


class _Ica(PruningMethod):
    @classmethod
    def load_inputs(cls, art: CalibrationArtifacts, params_path: str = "params.yaml", options=None) -> IcaInputs:
        return load_ica_inputs(art)

    def check(self, model: nn.Module) -> None:
        require(self.inputs is not None, f"prune.method={self.name} needs the ICA maps (artifacts/ica.zarr): run the "
                                         "ica stage and pass them as inputs (`load_ica_inputs`)")
        self.inputs.validate(model)


class IcaFaithful(_Ica):
    """`ica_fn`: the paper's key-neuron union at one bisected threshold, dense edge blocks, FFN only. The plan finds
    the threshold (`plan.ica_threshold_plan`, allocation `ica_threshold`) on the scores this method gives."""

    # a neuron is key at T exactly when its score exceeds T, so each block's `keep_mlp` top-scored neurons are its
    # key set; under `prune.align` they are the key set at a threshold of the block's own, next to the global T
    aligns_own_search = True

    def global_scores(self, model: nn.Module, units) -> UnitScores:
        """Every FFN neuron's ICA score; no attention unit is scored (none is pruned)."""
        return UnitScores(None, list(self.inputs.neuron_score))

    def attention(self, ctx: LayerContext) -> KeepAll:
        return KeepAll(ctx.where("o_proj"))

    def ffn(self, ctx: LayerContext) -> KeepAll | MaskPruner:
        if ctx.keep_mlp == ctx.n_ffn:  # a dense edge block, or one with no neuron below T: untouched
            return KeepAll(ctx.where("down_proj"))
        return MaskPruner(top_neurons(self.inputs.neuron_score[ctx.index], ctx.keep_mlp), ctx.where("down_proj"))


class IcaRanked(_Ica):
    """`ica_fn_ranked`: FFN neurons ranked by max |z| under the shared allocation; heads and bias as FLAP."""

    def attention(self, ctx: LayerContext) -> MetricPruner:
        return flap_pruner(ctx.layer.self_attn.o_proj.in_features, ctx.where("o_proj"))

    def ffn(self, ctx: LayerContext) -> MetricPruner:
        score = self.inputs.neuron_score[ctx.index]
        return MetricPruner(self.name, ctx.n_ffn, lambda w, _stats: score.to(w.device), ctx.where("down_proj"),
                            stats=True, compensate=flap_bias)

