"""Planning a prune: how many attention units and FFN neurons every block keeps, resolved in one call
(`plan_pruning`) before any layer is touched; the driver (`fang.methods.driver`) then only runs the
sequential pass with these counts. Every allocation is computed here; a method only gives data (its scores).

The keep counts come from the allocation (`prune.allocation`, `auto` = the method's registry line):
- one sparsity per block (`allocated_sparsity`): `uniform` (`sparsity` everywhere), `fc`/`taylor` (ASA's
  band on the calibration set's allocate.json scores), FANG's own `asa` (the same on the scores of
  allocate.mode, which its inputs carry: `PruningMethod.own_allocation`), or the per-block list given
  (`PruneOptions.block_sparsity`). Heads (GQA units) are rounded to that fraction and the FFN neurons
  absorb the rounding (`param_matched_structure`).
- a global search over every unit of every block (`GLOBAL_SEARCHES`, `global_search`):
  `flap_search`, FLAP's AL-AM structure search (`structure_search`) on the dense capture's statistics
  (`flap.al_am_scores`); SoBP's `first_order` and `first_order_split` (`first_order_plan`,
  `first_order_split_plan`) and ica_fn's `ica_threshold` (`ica_threshold_plan`: one global threshold) on
  the scores the method gives (`PruningMethod.global_scores`).

Then `prune.align` (`PruneOptions.align`, default 1 = no rounding) rounds every block's kept FFN width
to a multiple of `align` (`align_widths`), whatever the source of the counts, before any layer is
touched: each method then *selects* that many neurons, so the alignment is planned, not cut after the
selection. Heads are not rounded: a head is `head_dim` columns (64 on the default model), so every
attention width is already a multiple of any `align` dividing `head_dim`; for a larger `align` the
attention widths stay multiples of `head_dim` only (see docs/methods.md "Aligned widths").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..analysis.allocate import AllocationScores, allocate_sparsity, read_allocation_scores
from ..analysis.ica import DENSE_HEAD, DENSE_TAIL, prunable_layers
from ..core.choices import ALLOCATIONS, resolve_allocation
from ..core.errors import FangError, require
from ..model.modeling import count_block_params, decoder_layers
from ..model.offload import block_on_device
from . import flap
from .base import PruningMethod
from .units import AttentionUnits, PruneOptions, attention_units

# The allocations that are one sparsity per block (`allocated_sparsity`); FANG's own, "asa", is one too.
PER_BLOCK = ("uniform", "fc", "taylor")
# The allocations that search every unit of every block at once (`global_search`): FLAP's on the dense capture,
# the others on the scores of the method whose own allocation they are (`PruningMethod.global_scores`).
GLOBAL_SEARCHES = ("flap_search", "first_order", "first_order_split", "ica_threshold")


def allocated_sparsity(allocation: str, sparsity: float, n_blocks: int,
                       scores: AllocationScores | None = None) -> list[float]:
    """Each block's sparsity under a per-block allocation: `uniform`, `sparsity` in every block; `fc` / `taylor`,
    ASA's band around `sparsity` (`allocate.block_sparsity`) on the calibration set's functional complexity or
    Taylor sensitivity; `asa` (FANG's own), the same on the scores of the set's allocate.mode."""
    if allocation == "uniform":
        return [float(sparsity)] * n_blocks
    require(scores is not None, f"prune.allocation={allocation} needs the calibration set's allocation scores "
                                "(allocate.json)")
    if allocation == "asa":
        return allocate_sparsity(scores.mode, scores.scores, sparsity, n_blocks=len(scores.functional_complexity),
                                 max_sparsity=scores.max_sparsity)
    values = scores.functional_complexity if allocation == "fc" else scores.taylor_sensitivity
    if values is None:
        raise FangError(f"prune.allocation=taylor: {scores.source} has no Taylor "
                        "block sensitivity; rerun `fang allocate` (dvc repro allocate)")
    return allocate_sparsity(allocation, values, sparsity, n_blocks=len(values), max_sparsity=scores.max_sparsity)


def structure_search(
    attn_scores: list[Tensor],
    mlp_scores: list[Tensor],
    sparsity: float,
    attn_unit_params: int,
    neuron_params: int,
    min_attn_units: int = 1,
    min_neurons: int = 1,
    floors_in_budget: bool = False,
) -> tuple[list[int], list[int]]:
    """FLAP's adaptive structure search (AL-AM): how many attention units / neurons each layer keeps.

    `attn_scores` / `mlp_scores` are per-layer unit scores already on FLAP's common scale
    (`al_am_scores`). Every attention unit and neuron of every layer is ranked in one pool, each
    weighted by its parameter cost (FLAP's `compression_weight`: 512/3 for a LLaMA-7B head against
    1 for a neuron, i.e. `attn_unit_params / neuron_params`). As in FLAP, the threshold is the
    ranked unit whose cumulative cost is closest to (1 - sparsity) of the total, and only units
    ranked strictly above it are kept (FLAP keeps `metric > threshold`; here ties are broken by
    pool order so the result is deterministic).

    Each layer then keeps at least `min_attn_units` and `min_neurons` (both >= 1): a block with no
    attention head or no neuron would have zero-width projections, which neither attention nor
    the loader can represent (FLAP has no such floor). The floors may keep slightly more: each floored
    layer keeps its floor on top of the budget.

    `floors_in_budget=True` charges the floors to the budget instead: every layer's best `min_attn_units`
    and `min_neurons` are kept first, and the rest of the pool is cut where the kept total (floors
    included) is closest to (1 - sparsity) of the total, so the result is within half a unit of the budget
    however many layers the floors hold (a ranking that would empty many layers' attention, as SoBP's
    first-order scores per parameter do, otherwise under-prunes by a whole unit per such layer). When no
    floor binds it keeps the same units as the default, up to the threshold unit (kept here when that is
    closer to the budget).

    Returns (attention units kept per layer, neurons kept per layer).
    """
    require(
        len(attn_scores) == len(mlp_scores),
        f"structure_search: {len(attn_scores)} layers of attention scores but {len(mlp_scores)} of MLP scores",
    )
    require(len(attn_scores) > 0, "structure_search: no layers given")
    require(0.0 <= float(sparsity) < 1.0, f"structure_search: sparsity={sparsity} must be in [0, 1)")
    require(attn_unit_params > 0 and neuron_params > 0, "structure_search: unit parameter costs must be positive")
    require(
        min_attn_units >= 1 and min_neurons >= 1,
        "structure_search: minimum kept units must be >= 1 to keep layers runnable",
    )

    for kind, per_layer in (("attention", attn_scores), ("MLP", mlp_scores)):
        for i, s in enumerate(per_layer):
            require(s.numel() > 0, f"structure_search: layer {i} has no {kind} units")
            require(bool(torch.isfinite(s).all()), f"structure_search: layer {i} {kind} scores are not finite")
    n_layers = len(attn_scores)
    attn = [s.detach().reshape(-1).to(torch.float64).cpu() for s in attn_scores]
    mlp = [s.detach().reshape(-1).to(torch.float64).cpu() for s in mlp_scores]

    # pool order: attention units of every layer, then neurons (FLAP's torch.cat order); the stable
    # sort breaks score ties by this order, so results are deterministic
    pooled = torch.cat(attn + mlp)
    cost = torch.cat(
        [torch.full((z.numel(),), attn_unit_params, dtype=torch.int64) for z in attn]
        + [torch.full((z.numel(),), neuron_params, dtype=torch.int64) for z in mlp]
    )
    # unit -> (layer, is attention), to count kept units per layer afterwards
    layer_of = torch.cat(
        [torch.full((z.numel(),), i, dtype=torch.int64) for zs in (attn, mlp) for i, z in enumerate(zs)]
    )
    n_attn_total = sum(z.numel() for z in attn)
    is_attn = torch.arange(pooled.numel()) < n_attn_total

    order = torch.sort(pooled, descending=True, stable=True).indices
    if floors_in_budget and float(sparsity) > 0.0:
        kept = _kept_with_floors(order, cost, layer_of, is_attn, n_layers, float(sparsity), min_attn_units,
                                 min_neurons)
    else:
        cum = torch.cumsum(cost[order], 0).to(torch.float64)
        target = (1.0 - float(sparsity)) * float(cum[-1])
        n_take = int(torch.argmin((cum - target).abs()))  # FLAP: the threshold unit itself is not kept
        if float(sparsity) == 0.0:
            n_take = pooled.numel()
        kept = order[:n_take]

    # per layer, with the floors (already among `kept` when they were charged to the budget)
    attn_keep = torch.bincount(layer_of[kept[is_attn[kept]]], minlength=n_layers)
    mlp_keep = torch.bincount(layer_of[kept[~is_attn[kept]]], minlength=n_layers)
    attn_counts = [max(int(attn_keep[i]), min(min_attn_units, attn[i].numel())) for i in range(n_layers)]
    mlp_counts = [max(int(mlp_keep[i]), min(min_neurons, mlp[i].numel())) for i in range(n_layers)]
    return attn_counts, mlp_counts


def _kept_with_floors(order: Tensor, cost: Tensor, layer_of: Tensor, is_attn: Tensor, n_layers: int,
                      sparsity: float, min_attn_units: int, min_neurons: int) -> Tensor:
    """The pool units `structure_search` keeps with the floors charged to the budget: each layer's best
    `min_attn_units` units and `min_neurons` neurons (by the pool's ranking `order`) first, then the rest of
    the ranking while it brings the kept cost closer to (1 - sparsity) of the total."""
    rank_attn, rank_mlp = layer_of[order], is_attn[order]
    floor = torch.zeros(order.numel(), dtype=torch.bool)  # by rank position
    for attn_kind, minimum in ((True, min_attn_units), (False, min_neurons)):
        for i in range(n_layers):
            pos = torch.nonzero((rank_attn == i) & (rank_mlp == attn_kind)).reshape(-1)
            floor[pos[:minimum]] = True
    ranked_cost = cost[order].to(torch.float64)
    committed = float(ranked_cost[floor].sum())
    target = (1.0 - sparsity) * float(ranked_cost.sum())
    rest = torch.nonzero(~floor).reshape(-1)
    kept_cost = committed + torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(ranked_cost[rest], 0)])
    n_rest = int(torch.argmin((kept_cost - target).abs()))  # ties: the smaller count (argmin's first)
    return order[torch.cat([torch.nonzero(floor).reshape(-1), rest[:n_rest]])]


def global_top_k(scores: list[Tensor], keep_total: int, floor: int = 1) -> list[int]:
    """Keep counts per layer from one pool of equal-cost units ranked across layers: every layer's best `floor`
    units first, then the best of the rest, until `keep_total` are kept (ties broken by layer order, then unit).

    The per-module half of a global ranking: with one pool per unit kind (attention units, FFN neurons), the
    totals fix how much of each kind goes and the scores only decide *where*.
    """
    require(len(scores) > 0, "global_top_k: no layers given")
    require(floor >= 1, "global_top_k: the floor must be >= 1 to keep layers runnable")
    sizes = [int(s.numel()) for s in scores]
    floors = [min(floor, n) for n in sizes]
    require(sum(floors) <= keep_total <= sum(sizes),
            f"global_top_k: keep {keep_total} of {sum(sizes)} units with {sum(floors)} held by the floors")
    for i, s in enumerate(scores):
        require(s.numel() > 0, f"global_top_k: layer {i} has no units")
        require(bool(torch.isfinite(s).all()), f"global_top_k: layer {i} scores are not finite")
    ranked = [torch.sort(s.detach().reshape(-1).to(torch.float64).cpu(), descending=True, stable=True).values
              for s in scores]
    counts = list(floors)
    rest = torch.cat([r[f:] for r, f in zip(ranked, floors)])
    layer_of = torch.cat([torch.full((n - f,), i, dtype=torch.int64) for i, (n, f) in enumerate(zip(sizes, floors))])
    order = torch.sort(rest, descending=True, stable=True).indices[: keep_total - sum(floors)]
    for i, extra in enumerate(torch.bincount(layer_of[order], minlength=len(scores)).tolist()):
        counts[i] += extra
    return counts


def _per_layer(value: float | Sequence[float], n_layers: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        values = [float(value)] * n_layers
    else:
        values = [float(v) for v in value]
        require(len(values) == n_layers, f"uniform_structure: {name} has {len(values)} entries for {n_layers} layers")
    for v in values:
        require(0.0 <= v <= 1.0, f"uniform_structure: {name}={v} must be in [0, 1]")
    return values


def uniform_structure(
    n_attn_units: Sequence[int],
    n_neurons: Sequence[int],
    attn_sparsity: float | Sequence[float],
    mlp_sparsity: float | Sequence[float],
    min_attn_units: int = 1,
    min_neurons: int = 1,
) -> tuple[list[int], list[int]]:
    """Keep counts per layer for a given sparsity (one value or one per layer), rounded half up and
    kept at least at the minimums (>= 1, so every layer stays runnable)."""
    require(len(n_attn_units) == len(n_neurons), "uniform_structure: attention and MLP unit lists differ in length")
    require(min_attn_units >= 1 and min_neurons >= 1, "uniform_structure: minimum kept units must be >= 1")
    n_layers = len(n_attn_units)
    attn_s = _per_layer(attn_sparsity, n_layers, "attn_sparsity")
    mlp_s = _per_layer(mlp_sparsity, n_layers, "mlp_sparsity")

    def keep(n: int, s: float, minimum: int) -> int:
        return min(n, max(math.floor(n * (1.0 - s) + 0.5 + 1e-9), minimum))

    return (
        [keep(n, s, min_attn_units) for n, s in zip(n_attn_units, attn_s)],
        [keep(n, s, min_neurons) for n, s in zip(n_neurons, mlp_s)],
    )


def param_matched_structure(
    n_attn_units: Sequence[int],
    n_neurons: Sequence[int],
    sparsity: float | Sequence[float],
    attn_unit_params: int,
    neuron_params: int,
    block_params: Sequence[int],
    min_attn_units: int = 1,
    min_neurons: int = 1,
) -> tuple[list[int], list[int]]:
    """Keep counts per layer that remove `sparsity` of each block's *parameters*.

    Attention units are coarse (on SmolLM2 one KV group is a third of the attention), so rounding
    their count alone would miss the target: 40% of 3 groups removes 1 group (33%). The FFN
    neurons, which are fine-grained, absorb the difference, so every block lands within one
    neuron's parameters of its target (unless the FFN hits its own bounds).
    """
    keep_attn, _ = uniform_structure(n_attn_units, n_neurons, sparsity, sparsity, min_attn_units, min_neurons)
    n_layers = len(n_attn_units)
    block_s = _per_layer(sparsity, n_layers, "sparsity")
    require(len(block_params) == n_layers, f"param_matched_structure: {len(block_params)} block sizes for {n_layers} layers")
    require(attn_unit_params > 0 and neuron_params > 0, "param_matched_structure: unit sizes must be positive")
    keep_mlp = []
    for n_units, kept_units, n, s, size in zip(n_attn_units, keep_attn, n_neurons, block_s, block_params):
        attn_removed = (n_units - kept_units) * attn_unit_params
        n_remove = math.floor((s * size - attn_removed) / neuron_params + 0.5 + 1e-9)
        keep_mlp.append(n - min(max(n_remove, 0), n - min(min_neurons, n)))
    return keep_attn, keep_mlp


def _legal_widths(n: int, align: int, floor: int = 1) -> list[int]:
    """The widths a block of dense FFN width `n` may keep under `align`: every multiple of `align` from
    the first one at or above `floor` (at least one multiple) up to `n`, and `n` itself (a block left dense
    keeps its width, aligned or not)."""
    start = max(align, -(-floor // align) * align)
    return sorted(set(range(start, n + 1, align)) | {n})


def align_widths(keep: Sequence[int], widths: Sequence[int], align: int,
                 floors: Sequence[int] | None = None) -> list[int]:
    """Kept FFN widths rounded to multiples of `align` with their total as close as possible to `sum(keep)`.

    `keep[l]` is block l's planned width (what the allocation asked for), `widths[l]` its dense width.
    1. Every block that is pruned (keep < width) rounds to its nearest legal width (`_legal_widths`:
       a multiple of `align`, at least one multiple and at least `floors[l]`, the fewest neurons the
       method can keep there, at most the dense width; ties round up); a block
       the plan leaves dense stays dense.
    2. The total is repaired by moving whole multiples between pruned blocks, one at a time and only
       while a move brings the total closer to `sum(keep)`: when too many neurons are kept, the block
       rounded up the most gives one back (among equals, the one the allocation made the sparsest);
       when too few, the block rounded down the most takes one (among equals, the densest). That is
       largest-remainder rounding of the allocation's own counts: the total lands within half a
       multiple of the allocation's when the bounds allow, and, when no floor binds, each block
       within one multiple of what the allocation gave it (a floor can make another block give more).
    The attention is not touched, and every FFN neuron costs the same parameters (3 x hidden), so the
    total of kept neurons is the decoder-block parameter budget. `align=1` returns `keep` unchanged.
    """
    keep, widths = [int(k) for k in keep], [int(n) for n in widths]
    require(len(keep) == len(widths), f"align_widths: {len(keep)} kept widths for {len(widths)} blocks")
    require(isinstance(align, int) and not isinstance(align, bool) and align >= 1,
            f"prune.align={align!r} must be an integer >= 1")
    for li, (k, n) in enumerate(zip(keep, widths)):
        require(1 <= k <= n, f"align_widths: block {li} keeps {k} of {n} neurons")
    if align == 1:
        return keep
    narrow = min(range(len(widths)), key=lambda li: widths[li])
    require(widths[narrow] >= align, f"prune.align={align} is larger than the FFN width {widths[narrow]} of block "
                                     f"{narrow}: use an align of at most {widths[narrow]}")
    floors = [1] * len(widths) if floors is None else [int(f) for f in floors]
    require(len(floors) == len(widths), f"align_widths: {len(floors)} floors for {len(widths)} blocks")
    legal = [_legal_widths(n, align, f) for n, f in zip(widths, floors)]
    movable = [li for li in range(len(keep)) if keep[li] < widths[li]]
    out = list(keep)
    for li in movable:
        out[li] = min(legal[li], key=lambda v, t=keep[li]: (abs(v - t), -v))
    pos = {li: legal[li].index(out[li]) for li in movable}
    target = sum(keep)

    def preference(li: int, down: bool) -> tuple[int, float, int]:
        # the remainder keep - out (negative: rounded up), then the allocation's kept fraction, then block order
        return keep[li] - out[li], keep[li] / widths[li], li if down else -li

    while sum(out) != target:
        total = sum(out)
        down = total > target
        step = -1 if down else 1
        cands = [li for li in movable if 0 <= pos[li] + step < len(legal[li])
                 and abs(total - out[li] + legal[li][pos[li] + step] - target) < abs(total - target)]
        if not cands:
            break
        pick = (min if down else max)(cands, key=lambda li: preference(li, down))
        pos[pick] += step
        out[pick] = legal[pick][pos[pick]]
    return out


def flap_plan_from_capture(
    model: nn.Module, capture, sparsity: float, units: AttentionUnits
) -> tuple[list[int], list[int]]:
    """FLAP's global adaptive structure search on the dense model's captured input statistics."""
    layers = decoder_layers(model)
    columns = units.unit_columns()
    attn_scores, mlp_scores = [], []
    for li in range(len(layers)):
        o_var = torch.from_numpy(capture["o_proj_in_var"][li])
        d_var = torch.from_numpy(capture["down_in_var"][li])
        with block_on_device(model, li) as layer:  # a streamed model's blocks are read one at a time
            w_o = layer.self_attn.o_proj.weight.detach().double().cpu()
            w_d = layer.mlp.down_proj.weight.detach().double().cpu()
        attn, mlp = flap.al_am_scores(
            flap.fluctuation_metric(w_o, o_var), flap.fluctuation_metric(w_d, d_var), columns
        )
        attn_scores.append(attn)
        mlp_scores.append(mlp)
    return structure_search(attn_scores, mlp_scores, sparsity, units.params, units.neuron_params)


def pool_sparsity(sparsity: float, block_params: int, pool_params: int) -> float:
    """The fraction of the prunable pool (attention units and neurons) to remove so that `sparsity` of the
    blocks' parameters goes: the pool leaves out the norms and, with query slots (prune.gqa), the K and V
    projections, so cutting the pool at `sparsity` itself would remove less than asked."""
    require(0 < pool_params <= block_params,
            f"pool_sparsity: pool of {pool_params} in blocks of {block_params} parameters")
    s = float(sparsity) * block_params / pool_params
    require(s < 1.0, f"prune.sparsity={sparsity} asks for {s:.1%} of the prunable heads and neurons: no block could "
                     "keep one; lower it (or use prune.gqa: kv_group, which can remove K and V too)")
    return s


def first_order_plan(attn_scores: list[Tensor], mlp_scores: list[Tensor], sparsity: float, attn_unit_params: int,
                     neuron_params: int) -> tuple[list[int], list[int]]:
    """SoBP's allocation (`first_order`): keep counts per block from one global pool of every unit and neuron,
    ranked by estimated loss change per parameter it removes (`sobp.first_order_scores`), cut where the kept
    parameters are closest to (1 - sparsity) of the total (`structure_search`). Every block keeps at least one unit
    and one neuron, and those floors are charged to the budget: per parameter, a whole attention unit's
    first-order loss change is small against a neuron's, so the pool empties the attention of most blocks, and
    floors added on top of the cut under-pruned by a unit per such block (27.6% at a 30% target on the default
    model)."""
    require(attn_unit_params > 0 and neuron_params > 0, "first_order_plan: unit parameter costs must be positive")
    return structure_search([s / attn_unit_params for s in attn_scores], [s / neuron_params for s in mlp_scores],
                            sparsity, attn_unit_params, neuron_params, floors_in_budget=True)


def first_order_split_plan(attn_scores: list[Tensor], mlp_scores: list[Tensor], sparsity: float,
                           attn_unit_params: int, neuron_params: int, block_params: list[int]) -> tuple[list[int], list[int]]:
    """Keep counts per block from SoBP's first-order scores pooled per module type (`sobp+first_order_split`).

    How many attention units and how many neurons go *in all* is the parameter-matched split every other row
    uses (`param_matched_structure` at `sparsity` in every block, summed); *where* they go is SoBP's global
    first-order ranking, one pool of attention units and one of neurons across all blocks (`global_top_k`, every
    block keeps at least one of each). The joint pool (`first_order_plan`) ranks a whole attention unit by its
    loss change per parameter against single neurons and so empties most blocks' attention on SmolLM2-135M; this
    reading keeps SoBP's global, cross-layer selection without letting the per-parameter exchange rate decide the
    attention/FFN split.
    """
    n_layers = len(attn_scores)
    require(len(mlp_scores) == n_layers and len(block_params) == n_layers,
            f"first_order_split_plan: {n_layers} attention, {len(mlp_scores)} FFN and {len(block_params)} block sizes")
    keep_attn, keep_mlp = param_matched_structure([s.numel() for s in attn_scores], [s.numel() for s in mlp_scores],
                                                  sparsity, attn_unit_params, neuron_params, block_params)
    return global_top_k(attn_scores, sum(keep_attn)), global_top_k(mlp_scores, sum(keep_mlp))


def neurons_to_remove(model: nn.Module, sparsity: float) -> int:
    """FFN neurons whose gate/up rows and down column (3 x hidden parameters each) make up `sparsity`
    of the decoder-block parameters, rounded to the nearest neuron (ica_fn's target)."""
    per_neuron = 3 * model.config.hidden_size
    return int(sparsity * count_block_params(model) / per_neuron + 0.5)


def bisect_threshold(scores: Tensor, n_keep: int, max_iter: int = 200) -> float:
    """Threshold T with exactly `n_keep` entries of `scores` (any shape) above it, found by bisection.

    One T for all prunable layers, as the ICA paper's hand-tuned T; bisection replaces the hand tuning.
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
    """Keep masks [layers, n] of ica_fn's faithful mode removing exactly `n_remove` FFN neurons.

    `scores` is `analysis.ica.neuron_score` per layer [layers, n]; edge layers stay dense and every pruned
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


def ica_threshold_plan(scores: list[Tensor], n_remove: int, n_units: int) -> tuple[list[int], list[int], list[dict]]:
    """ica_fn's allocation (`ica_threshold`): every block's attention units (`n_units`, none is pruned) and the
    neurons above one global threshold on the ICA neuron scores (`faithful_masks`, removing `n_remove`), with each
    block's report note: `dense_edge` for the edge blocks, else the threshold."""
    stacked = torch.stack([s.detach() for s in scores])
    n_layers, n = stacked.shape
    if n_remove == 0:
        keep, threshold = torch.ones(n_layers, n, dtype=torch.bool), None
    else:
        keep, threshold = faithful_masks(stacked, n_remove)
    inner, notes = prunable_layers(n_layers), []
    for li in range(n_layers):
        if li not in inner:
            notes.append({"dense_edge": True})  # the paper's first three and last two blocks
        else:
            notes.append({} if threshold is None else {"ica_threshold": round(threshold, 6)})
    return [n_units] * n_layers, [int(k.sum()) for k in keep], notes


def global_search(allocation: str, model: nn.Module, capture, method: PruningMethod, sparsity: float,
                  units: AttentionUnits) -> tuple[list[int], list[int], list[dict] | None]:
    """Keep counts (attention units, neurons) per block of one of the GLOBAL_SEARCHES, and what the search adds to
    each block's line of the prune report (None: nothing). At sparsity 0 every block stays dense."""
    layers = decoder_layers(model)
    if sparsity == 0:
        return [units.count] * len(layers), [layer.mlp.down_proj.in_features for layer in layers], None
    if allocation == "flap_search":
        return (*flap_plan_from_capture(model, capture, sparsity, units), None)
    scores = method.global_scores(model, units)
    require(scores is not None, f"prune.allocation={allocation}: {method.name} gives no scores to search")
    if allocation == "ica_threshold":
        return ica_threshold_plan(scores.ffn, neurons_to_remove(model, sparsity), units.count)
    block_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    if allocation == "first_order_split":
        keep = first_order_split_plan(scores.attention, scores.ffn, sparsity, units.params, units.neuron_params,
                                      block_params)
    else:
        pool = sum(units.count * units.params + layer.mlp.down_proj.in_features * units.neuron_params
                   for layer in layers)
        keep = first_order_plan(scores.attention, scores.ffn, pool_sparsity(sparsity, sum(block_params), pool),
                                units.params, units.neuron_params)
    # the loss change SoBP's first-order scores estimate for removing all of a block's units, per kind
    notes = [{"first_order_loss_change": {"attention": round(float(a.sum()), 8), "ffn": round(float(m.sum()), 8)}}
             for a, m in zip(scores.attention, scores.ffn)]
    return (*keep, notes)


def _block_sparsity(values, n_layers: int, name: str) -> list[float]:
    values = [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    require(len(values) == n_layers, f"{name} has {len(values)} entries for {n_layers} layers")
    require(all(0.0 <= v < 1.0 for v in values), f"{name} values must be in [0, 1), got {values}")
    return values


def per_block_sparsity(allocation: str, sparsity: float, n_layers: int, method: PruningMethod,
                       given: Sequence[float] | None = None, art=None) -> tuple[list[float] | None, list[float]]:
    """(the allocation's per-block sparsity as the report gives it, None for the method's own; each block's
    sparsity) of a per-block allocation: `given` (`PruneOptions.block_sparsity`), else uniform/fc/taylor
    computed from the calibration set `art`'s allocate.json, else the method's own allocation
    (`PruningMethod.own_allocation`: FANG's block scores, computed here, or a list given as is), else `sparsity`."""
    if given is not None:
        return given, _block_sparsity(given, n_layers, "PruneOptions.block_sparsity")
    own = method.own_allocation()
    shared = art is not None and allocation in PER_BLOCK  # from the calibration set's allocate.json
    if not shared and not isinstance(own, AllocationScores):  # a list the method gives as is, or none
        if own is None:
            return None, [float(sparsity)] * n_layers
        return None, _block_sparsity(own, n_layers, f"{method.name}'s block sparsity")
    if shared:
        scores = None if allocation == "uniform" else read_allocation_scores(art.allocate)
    else:
        scores = own
    values = allocated_sparsity(allocation, sparsity, n_layers, scores)
    name = "PruneOptions.block_sparsity" if shared else f"{method.name}'s block sparsity"
    return (values if shared else None), _block_sparsity(values, n_layers, name)


@dataclass
class Plan:
    """What every block keeps, before any is pruned."""

    allocation: str  # the concrete allocation (`auto` resolved: flap_search, asa, uniform, ...)
    block_sparsity: list[float] | None  # the allocation's per-block sparsity (None: searched, or the method's own)
    units: AttentionUnits
    keep_attn: list[int]  # attention units kept per block
    keep_mlp: list[int]  # FFN neurons kept per block (aligned to `align`)
    n_ffns: list[int]  # the dense FFN widths
    align: int = 1  # prune.align: every pruned block's kept width is a multiple of it
    unaligned_mlp: list[int] | None = None  # the allocation's widths before `align_widths` (None: align 1)
    notes: list[dict] | None = None  # per block, what the global search adds to its report line (None: nothing)

    @property
    def removes_nothing(self) -> bool:
        return self.keep_attn == [self.units.count] * len(self.keep_attn) and self.keep_mlp == self.n_ffns


def plan_pruning(model: nn.Module, capture, method: PruningMethod, sparsity: float, gqa_scheme: str,
                 options: PruneOptions, art=None) -> Plan:
    """Resolve the allocation, the attention units (`gqa_scheme`) and every block's keep counts of pruning
    `model` with `method` to `sparsity` (see the module's docstring for the sources of the counts).

    A global search ranks every block's units at once (`global_search`); any other allocation gives each block a
    sparsity (`per_block_sparsity`: `options.block_sparsity`, the calibration set `art`'s allocate.json scores,
    or the method's own) that `param_matched_structure` turns into counts. The FFN widths are then aligned to
    `options.align` (`align_widths`); a method's own global search must allow it (`aligns_own_search`).
    """
    layers = decoder_layers(model)
    n_layers = len(layers)
    n_ffns = [layer.mlp.down_proj.in_features for layer in layers]
    allocation = resolve_allocation(method.name, options.allocation)
    units = attention_units(model.config, gqa_scheme)
    if allocation in GLOBAL_SEARCHES:
        block_sparsity = options.block_sparsity  # reported as given; a search does not read it
        keep_attn, keep_mlp, notes = global_search(allocation, model, capture, method, sparsity, units)
    else:
        block_sparsity, per_block = per_block_sparsity(allocation, sparsity, n_layers, method, options.block_sparsity,
                                                       art)
        block_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        keep_attn, keep_mlp = param_matched_structure(
            [units.count] * n_layers, n_ffns, per_block, units.params, units.neuron_params, block_params
        )
        notes = None
    align = int(options.align)
    aligned = align_widths(keep_mlp, n_ffns, align, method.ffn_floors(n_ffns) if align > 1 else None)
    own_search = allocation in GLOBAL_SEARCHES and allocation not in ALLOCATIONS
    if own_search and not method.aligns_own_search and aligned != list(keep_mlp):
        raise FangError(f"prune.method={method.name} chooses its own FFN widths and cannot follow prune.align; "
                        "use prune.align: 1")
    return Plan(allocation, block_sparsity, units, keep_attn, aligned, n_ffns, align,
                None if align == 1 else list(keep_mlp), notes)
