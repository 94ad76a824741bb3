"""GPrune-LLM (seed 002) as a pruning method, from the modules of stage `gprune_modules` (artifacts/gprune.zarr;
the analysis is `fang.analysis.gprune`).

Per block, the allocation shared with the other methods (uniform by default) gives the number of FFN
neurons to keep; `layer_keep` splits it over the block's modules (module sparsity shifted by
each module's standardized rank drift, `gprune.module_gamma`, capped at `gprune.max_sparsity`) and
keeps the top neurons of each module by its within-module score (activation score, or weight
magnitude where the reliability switch flipped). Heads and compensation follow the base activation
metric the modules were built with (`gprune.metric`): Wanda-sp heads and no compensation (the
default, so `gprune` differs from `wanda_sp` only in how it ranks FFN neurons), or FLAP heads and
bias compensation. Module sparsity and the switch are computed in the `gprune_modules` stage from
the dense model; only the keep counts are applied here, on the sequential pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..analysis.gprune import within_module_score
from ..analysis.store import open_store
from ..core.errors import FangError, require
from ..core.params import load_block
from ..core.paths import CalibrationArtifacts
from ..model.modeling import decoder_layers
from .base import LayerContext, MetricPruner, PruningMethod, Selection
from .flap import flap_bias, flap_metric, flap_pruner
from .stats import InputStats
from .wanda_sp import wanda_sp_metric, wanda_sp_pruner


def module_keep_counts(size: Tensor, drift: Tensor, n_keep: int, gamma: float = 0.1,
                       max_sparsity: float = 0.95) -> Tensor:
    """Neurons each module keeps, summing to exactly `n_keep` -> long [M].

    Ours (the paper learns thresholds by training): sparsity_m = clip(b + gamma x z_m, 0, max_sparsity)
    with z_m the module's standardized drift, so distribution-sensitive modules give up more and
    robust ones are not crowded out; b is found by bisection to meet the budget, and the fractional
    keeps are rounded by largest remainder.
    """
    size = size.double()
    total = int(size.sum())
    floor = torch.ceil(size * (1 - max_sparsity) - 1e-9).clamp(max=size)
    require(int(floor.sum()) <= n_keep <= total,
            f"cannot keep {n_keep} of {total} neurons with every module keeping at least 1 - "
            f"gprune.max_sparsity={max_sparsity} of itself ({int(floor.sum())} neurons)")
    d = drift.double()
    z = (d - d.mean()) / d.std(unbiased=False) if len(d) > 1 and float(d.std(unbiased=False)) > 0 else torch.zeros_like(d)

    def keeps(b: float) -> Tensor:
        return torch.maximum(size * (1 - (b + gamma * z).clamp(0, max_sparsity)), floor)

    reach = 1.0 + gamma * float(z.abs().max()) if len(z) else 1.0
    lo, hi = -reach, reach
    for _ in range(100):  # keeps(b) falls as b rises
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(keeps(mid).sum()) > n_keep else (lo, mid)
    exact = keeps(hi)
    counts = torch.minimum(exact.floor(), size)
    short = n_keep - int(counts.sum())
    if short > 0:
        room = (counts < size)
        order = torch.argsort(torch.where(room, exact - counts, torch.full_like(exact, -1.0)), descending=True)
        counts[order[:short]] += 1
    elif short < 0:
        order = torch.argsort(torch.where(counts > floor, counts - exact, torch.full_like(exact, -1.0)), descending=True)
        counts[order[:-short]] -= 1
    if int(counts.sum()) != n_keep:
        raise FangError(f"module budget rounding missed: {int(counts.sum())} kept instead of {n_keep}")
    return counts.long()


def select_neurons(modules: Tensor, score: Tensor, counts: Tensor) -> Tensor:
    """Keep mask [n]: in each module, its `counts[m]` highest-scoring neurons (ranking stays inside modules)."""
    keep = torch.zeros(modules.numel(), dtype=torch.bool)
    for c in range(len(counts)):
        idx = (modules == c).nonzero().flatten()
        if len(idx) and int(counts[c]):
            keep[idx[score[idx].argsort(descending=True)[: int(counts[c])]]] = True
    return keep


def layer_keep(modules: Tensor, score: Tensor, module_drift: Tensor, n_keep: int, gamma: float = 0.1,
               max_sparsity: float = 0.95) -> Tensor:
    """What method `gprune` keeps of one block's FFN given its budget: module counts, then per-module ranking.

    Inputs are one layer's rows of `artifacts/gprune.zarr` (`modules`, `score`, `module_drift`).
    """
    modules = torch.as_tensor(modules).long()
    m = int(modules.max()) + 1
    size = torch.bincount(modules, minlength=m)
    counts = module_keep_counts(size, torch.as_tensor(module_drift)[:m], n_keep, gamma, max_sparsity)
    return select_neurons(modules, torch.as_tensor(score).double(), counts)


@dataclass
class GPruneInputs:
    """What `gprune` reads of artifacts/gprune.zarr, and its two prune-time keys of the gprune block."""

    modules: Tensor  # [layers, n_ffn] module id per neuron
    score: Tensor  # [layers, n_ffn] within-module ranking score
    module_drift: Tensor  # [layers, n_modules] mean rank drift (NaN for unused module slots)
    switched: Tensor  # [layers, n_modules] modules ranked by weight magnitude
    metric: str  # base activation metric: "wanda_sp" or "flap"
    module_gamma: float = 0.1
    max_sparsity: float = 0.95

    def validate(self, model: nn.Module) -> None:
        layers = decoder_layers(model)
        n_ffns = {layer.mlp.down_proj.in_features for layer in layers}
        require(len(n_ffns) == 1, "gprune needs a dense model: the FFN widths differ between layers")
        want = (len(layers), n_ffns.pop())
        for name in ("modules", "score"):
            shape = tuple(getattr(self, name).shape)
            require(shape == want, f"gprune.zarr {name} is {shape}, the model has {want} (layers, FFN neurons): "
                                   "the modules are of another model; rerun the gprune_modules stage")
        require(self.metric in ("wanda_sp", "flap"), f"gprune.zarr was built with metric {self.metric!r}")


def load_gprune_inputs(art: CalibrationArtifacts, params_path: str = "params.yaml") -> GPruneInputs:
    g = open_store(art.gprune, "gprune", "gprune_modules")
    p = load_block("gprune", path=params_path)
    return GPruneInputs(torch.from_numpy(g["modules"][:]).long(), torch.from_numpy(g["score"][:]).double(),
                        torch.from_numpy(g["module_drift"][:]).double(), torch.from_numpy(g["switched"][:]),
                        str(g.attrs["metric"]), p.module_gamma, p.max_sparsity)


class ModulePruner:
    """One block's FFN: per-module keep counts and per-module ranking (`layer_keep`).

    The modules, their drift and the switch come from the dense model's multi-source analysis (the
    paper's contribution); the activation score that ranks neurons inside robust modules is measured
    here, on the sequential pass's inputs, like its baseline's (wanda_sp or flap: ours, the text does
    not say). Ranking by the dense model's scores instead, with no switch and every module at the
    block's sparsity, gave 2.9x wanda_sp's perplexity at 30% on the default model (commit 1b0d9f4; the
    method: docs/methods.md "Functional networks (ICA) and GPrune-LLM")."""

    def __init__(self, inputs: GPruneInputs, layer: int, where: str) -> None:
        self.inputs, self.layer, self.where = inputs, layer, where
        self.stats = InputStats()

    def add_batch(self, x: Tensor) -> None:
        self.stats.add_batch(x)

    def select(self, weight: Tensor, n_keep: int, units: Tensor | None = None) -> Selection:
        g, li = self.inputs, self.layer
        m = int(g.modules[li].max()) + 1
        switched = g.switched[li, :m]
        running = (wanda_sp_metric(weight, self.stats.sum_sq) if g.metric == "wanda_sp"
                   else flap_metric(weight, self.stats))
        # switched modules keep the stage's score (weight magnitude there); the others rank by the base
        # metric on the running (already pruned) inputs, the statistic the baseline method ranks by
        stage_score = g.score[li]
        score = within_module_score(running.to(stage_score.device), stage_score, g.modules[li], switched.bool())
        mask = layer_keep(g.modules[li], score, g.module_drift[li], n_keep, g.module_gamma, g.max_sparsity)
        keep = torch.nonzero(mask).reshape(-1)
        require(len(keep) == n_keep, f"{self.where}: the modules keep {len(keep)} neurons, the plan {n_keep}")
        bias = None if g.metric != "flap" else flap_bias(weight.detach(), self.stats, keep)
        info = {"modules": m, "switched_modules": int(switched.sum()),
                "switched_neurons_kept": int(switched[g.modules[li][keep]].sum())}
        return Selection(keep, bias=bias, info=info)


class GPrune(PruningMethod):
    @classmethod
    def load_inputs(cls, art: CalibrationArtifacts, params_path: str = "params.yaml", options=None) -> GPruneInputs:
        return load_gprune_inputs(art, params_path)

    def check(self, model: nn.Module) -> None:
        require(self.inputs is not None, "prune.method=gprune needs the GPrune modules (artifacts/gprune.zarr): run the "
                                         "gprune_modules stage and pass them as inputs (`load_gprune_inputs`)")
        self.inputs.validate(model)

    def attention(self, ctx: LayerContext) -> MetricPruner:
        n = ctx.layer.self_attn.o_proj.in_features
        make = flap_pruner if self.inputs.metric == "flap" else wanda_sp_pruner
        return make(n, ctx.where("o_proj"))

    def ffn(self, ctx: LayerContext) -> ModulePruner:
        return ModulePruner(self.inputs, ctx.index, ctx.where("down_proj"))
