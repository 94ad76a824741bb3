"""ICA functional networks (seed 003) as pruning methods, from the maps of stage `ica` (artifacts/ica.zarr).

Two registry names, one per mode of the paper's method:

- `ica_fn` (faithful): keep the union of key neurons, |z| > T in any component for the act or the up
  column (`analysis.ica.key_neurons`), with one T for every prunable block found by bisection so that
  exactly the target number of FFN neurons goes (`faithful_masks` below; the paper hand-tunes T).
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

from ..analysis.ica import DENSE_HEAD, DENSE_TAIL, key_neurons, neuron_score, prunable_layers
from ..analysis.store import open_store
from ..core.errors import FangError, require
from ..core.paths import CalibrationArtifacts
from ..model.modeling import count_block_params, decoder_layers
from .base import KeepAll, LayerContext, MetricPruner, PruningMethod, Selection
from .flap import flap_bias, flap_pruner
from .stats import InputStats


MODES = ("faithful", "ranked")


def bisect_threshold(scores: Tensor, n_keep: int, max_iter: int = 200) -> float:
    """Threshold T with exactly `n_keep` entries of `scores` (any shape) above it, found by bisection.

    One T for all prunable layers, as the paper's hand-tuned T; bisection replaces the hand tuning.
    """
    flat = scores.detach().reshape(-1).double()
    require(0 <= n_keep <= flat.numel(), f"cannot keep {n_keep} of {flat.numel()} neurons")
    lo, hi = 0.0, float(flat.max()) + 1.0  # count(lo) >= n_keep >= count(hi) = 0
    if int((flat > lo).sum()) < n_keep:
        raise FangError(f"only {int((flat > lo).sum())} neurons have a non-zero ICA score; cannot keep {n_keep}")
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        count = int((flat > mid).sum())
        if count == n_keep:
            return mid
        lo, hi = (mid, hi) if count > n_keep else (lo, mid)
    raise FangError(f"no ICA threshold keeps exactly {n_keep} neurons: tied scores at the boundary near T={lo:.6g}")


def faithful_masks(scores: Tensor, n_remove: int) -> tuple[Tensor, float]:
    """Keep masks [layers, n] of the faithful mode removing exactly `n_remove` FFN neurons.

    `scores` is `neuron_score` per layer [layers, n]; edge layers stay dense and every pruned
    layer keeps at least the neurons above T (the key set), found by bisection on one global T.
    """
    n_layers, n = scores.shape
    layers = prunable_layers(n_layers)
    require(len(layers) > 0, f"ica_fn faithful: a model of {n_layers} blocks has no block outside the dense edges "
                             f"(first {DENSE_HEAD}, last {DENSE_TAIL})")
    pool = scores[layers]
    require(0 <= n_remove < pool.numel(),
            f"ica_fn faithful: removing {n_remove} neurons needs more than the {pool.numel()} in blocks "
            f"{layers[0]}..{layers[-1]} (edge blocks stay dense); lower the sparsity or use mode ranked")
    t = bisect_threshold(pool, pool.numel() - n_remove)
    keep = torch.ones(n_layers, n, dtype=torch.bool)
    keep[layers] = pool > t
    empty = [layers[i] for i in range(len(layers)) if not keep[layers[i]].any()]
    require(not empty, f"ica_fn faithful: threshold T={t:.3g} empties blocks {empty}; lower the sparsity")
    return keep, t


def layer_decision(mode: str, layer: int, n_layers: int, maps: Tensor, threshold: float | None = None) -> Tensor:
    """Per-layer output of the method: `faithful` -> keep mask [n] (dense on edge layers),
    `ranked` -> neuron score [n] for the shared per-block allocation to select from."""
    require(mode in MODES, f"ica_fn mode {mode!r}: use {' or '.join(MODES)}")
    if mode == "ranked":
        return neuron_score(maps)
    require(threshold is not None, "ica_fn faithful: a threshold is needed (see faithful_masks)")
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


def neurons_to_remove(model: nn.Module, sparsity: float) -> int:
    """FFN neurons whose gate/up rows and down column (3 x hidden parameters each) make up `sparsity`
    of the decoder-block parameters, rounded to the nearest neuron."""
    per_neuron = 3 * model.config.hidden_size
    return int(sparsity * count_block_params(model) / per_neuron + 0.5)


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
    """`ica_fn`: the paper's key-neuron union at one bisected threshold, dense edge blocks, FFN only."""

    def plan(self, model: nn.Module, sparsity: float, units) -> tuple[list[int], list[int]]:
        scores = self.inputs.neuron_score
        n_layers, n = scores.shape
        n_remove = neurons_to_remove(model, sparsity)
        if n_remove == 0:
            self.keep, self.threshold = torch.ones(n_layers, n, dtype=torch.bool), None
        else:
            self.keep, self.threshold = faithful_masks(scores, n_remove)
        return [units.count] * n_layers, [int(k.sum()) for k in self.keep]

    def adopt_widths(self, keep_mlp: list[int]) -> None:
        """`prune.align`: each block keeps its `keep_mlp` top neurons by the same score the threshold cuts
        (a neuron is key at T exactly when its score exceeds T), so the aligned masks are the key sets at
        one threshold per block, next to the global T; the dense edge blocks stay dense."""
        scores = self.inputs.neuron_score
        require(len(keep_mlp) == scores.shape[0], f"ica_fn: {len(keep_mlp)} widths for {scores.shape[0]} blocks")
        keep = torch.zeros_like(self.keep)
        for li, k in enumerate(keep_mlp):
            order = torch.sort(scores[li], descending=True, stable=True).indices
            keep[li, order[:k]] = True
        self.keep = keep

    def attention(self, ctx: LayerContext) -> KeepAll:
        return KeepAll(ctx.where("o_proj"))

    def ffn(self, ctx: LayerContext) -> KeepAll | MaskPruner:
        if ctx.keep_mlp == ctx.n_ffn:  # a dense edge block, or one with no neuron below T: untouched
            return KeepAll(ctx.where("down_proj"))
        return MaskPruner(self.keep[ctx.index], ctx.where("down_proj"))

    def finish_layer(self, ctx: LayerContext, ffn: Selection) -> None:
        n_layers = self.keep.shape[0]
        if ctx.index not in prunable_layers(n_layers):
            ctx.entry["dense_edge"] = True  # the paper's first three and last two blocks (ica_fn.prunable_layers)
        elif self.threshold is not None:
            ctx.entry["ica_threshold"] = round(self.threshold, 6)


class IcaRanked(_Ica):
    """`ica_fn_ranked`: FFN neurons ranked by max |z| under the shared allocation; heads and bias as FLAP."""

    def attention(self, ctx: LayerContext) -> MetricPruner:
        return flap_pruner(ctx.layer.self_attn.o_proj.in_features, ctx.where("o_proj"))

    def ffn(self, ctx: LayerContext) -> MetricPruner:
        score = self.inputs.neuron_score[ctx.index]
        return MetricPruner(self.name, ctx.n_ffn, lambda w, _stats: score.to(w.device), ctx.where("down_proj"),
                            stats=True, compensate=flap_bias)

