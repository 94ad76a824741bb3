"""FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI 2024): tensor functions and the method.

The recipe, per decoder block:
1. stream the input of `o_proj` and `down_proj` over calibration tokens (`stats.InputStats`);
2. score each input channel by how much the layer output fluctuates through it (`fluctuation_metric`);
3. pool channels into prunable units: attention heads / KV groups / query slots, MLP neurons;
4. choose how many units every block keeps from one global ranking (`structure_search`);
5. keep the top units (`base.select_top`) and fold the removed channels' mean contribution into a bias
   (`bias_compensation`), so the block's mean output on calibration data is unchanged.

Statistics are kept in float64: per-channel variances of activations with large means (LLM outliers)
lose most of their digits in float32 when accumulated over hundreds of thousands of tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..core.errors import require
from .base import LayerContext, MetricPruner, PruningMethod
from .stats import InputStats


def fluctuation_metric(weight: Tensor, variance: Tensor) -> Tensor:
    """FLAP's WIFV score per input channel j: variance_j * ||W[:, j]||^2 (float64, on weight's device).

    A channel matters when its input varies (a constant input can be replaced by a bias, see
    `bias_compensation`) and the weights reading it are large.
    """
    require(weight.dim() == 2, f"fluctuation_metric: weight must be [out, C], got {tuple(weight.shape)}")
    require(
        variance.dim() == 1 and variance.numel() == weight.shape[1],
        f"fluctuation_metric: variance has {variance.numel()} channels, weight has {weight.shape[1]} input channels",
    )
    col_sq_norm = torch.linalg.vector_norm(weight.detach(), dim=0, dtype=torch.float64).square()
    return variance.to(device=col_sq_norm.device, dtype=torch.float64) * col_sq_norm


def head_scores(channel_metric: Tensor, head_dim: int) -> Tensor:
    """Average the per-channel metric over each head's `head_dim` consecutive channels -> [n_heads]."""
    require(head_dim > 0, f"head_scores: head_dim={head_dim} must be positive")
    n = channel_metric.numel()
    require(n % head_dim == 0, f"head_scores: {n} channels do not split into heads of {head_dim}")
    return channel_metric.reshape(n // head_dim, head_dim).mean(1)


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


def standardize(metric: Tensor) -> Tensor:
    """z-score one layer's per-channel metric, as FLAP's `standarlization` does (sample std).

    A layer whose channels all score the same (or that has a single channel) has no spread to
    standardize: its channels get z = 0 (FLAP would divide by zero and produce NaN).
    """
    x = metric.detach().reshape(-1).to(torch.float64).cpu()
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    if not bool(std > 0):
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def al_am_scores(o_metric: Tensor, down_metric: Tensor, unit_columns: Tensor) -> tuple[Tensor, Tensor]:
    """One layer's unit scores for FLAP's global AL-AM search (CASIA-IVA-Lab/FLAP `prune_flap`).

    Attention: the o_proj fluctuation metric is squared, z-scored over the layer's o_proj *input
    channels*, and only then averaged over each unit's channels (FLAP: `reshape(layers, -1, 128)
    .mean(2)` per head). A unit is a head, or on GQA models a KV group or a query slot; its score is
    the mean z of all its channels, i.e. the mean of its heads' FLAP head scores.
    MLP: the down_proj fluctuation metric (not squared), z-scored over the layer's neurons.

    Standardizing channels before pooling matters: z-scoring the 3 KV-group means of a GQA layer
    would force scores that sum to 0 with squares summing to 2 whatever the layer's importance.
    Returns (attention unit scores [n_units], neuron scores [n_ffn]), float64.
    """
    require(unit_columns.dim() == 2, f"al_am_scores: unit_columns must be [units, width], got {tuple(unit_columns.shape)}")
    require(
        int(unit_columns.max()) < o_metric.numel(),
        f"al_am_scores: unit columns reach {int(unit_columns.max())} but o_proj has {o_metric.numel()} input channels",
    )
    attn_z = standardize(o_metric.to(torch.float64).square())
    return attn_z[unit_columns.cpu()].mean(1), standardize(down_metric)


def structure_search(
    attn_scores: list[Tensor],
    mlp_scores: list[Tensor],
    sparsity: float,
    attn_unit_params: int,
    neuron_params: int,
    min_attn_units: int = 1,
    min_neurons: int = 1,
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
    the loader can represent (FLAP has no such floor). The floors may keep slightly more.

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
    cum = torch.cumsum(cost[order], 0).to(torch.float64)
    target = (1.0 - float(sparsity)) * float(cum[-1])
    n_take = int(torch.argmin((cum - target).abs()))  # FLAP: the threshold unit itself is not kept
    if float(sparsity) == 0.0:
        n_take = pooled.numel()

    kept = order[:n_take]
    attn_keep = torch.bincount(layer_of[kept[is_attn[kept]]], minlength=n_layers)
    mlp_keep = torch.bincount(layer_of[kept[~is_attn[kept]]], minlength=n_layers)
    attn_counts = [max(int(attn_keep[i]), min(min_attn_units, attn[i].numel())) for i in range(n_layers)]
    mlp_counts = [max(int(mlp_keep[i]), min(min_neurons, mlp[i].numel())) for i in range(n_layers)]
    return attn_counts, mlp_counts


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


def bias_compensation(weight: Tensor, mean: Tensor, keep: Tensor) -> Tensor:
    """FLAP's baseline bias W[:, pruned] @ mean[pruned] -> [out], in weight's dtype.

    Removing input channels removes their average contribution to the output too; adding it back
    as a constant keeps the layer's mean output on calibration data equal to the dense layer's.
    Add it to any existing bias.
    """
    require(weight.dim() == 2, f"bias_compensation: weight must be [out, C], got {tuple(weight.shape)}")
    n_in = weight.shape[1]
    require(mean.numel() == n_in, f"bias_compensation: mean has {mean.numel()} channels, weight has {n_in}")
    pruned = torch.ones(n_in, dtype=torch.bool, device=weight.device)
    pruned[keep.to(weight.device)] = False
    w = weight.detach()[:, pruned].to(torch.float64)
    m = mean.detach().reshape(-1).to(device=weight.device, dtype=torch.float64)[pruned]
    return (w @ m).to(weight.dtype)


def flap_bias(weight: Tensor, stats: InputStats, keep_columns: Tensor) -> Tensor:
    """`bias_compensation` from streamed input statistics (`base.MetricPruner`'s compensation hook)."""
    return bias_compensation(weight, stats.mean.to(weight.device), keep_columns.to(weight.device))


def flap_metric(weight: Tensor, stats: InputStats | None) -> Tensor:
    """`fluctuation_metric` from streamed input statistics."""
    return fluctuation_metric(weight, stats.variance)


def flap_pruner(n_channels: int, where: str) -> MetricPruner:
    """FLAP on one Linear input: fluctuation metric, top units, bias compensation (also F-FANG's heads)."""
    return MetricPruner("flap", n_channels, flap_metric, where, stats=True, compensate=flap_bias)


class Flap(PruningMethod):
    """FLAP: fluctuation metric on heads and neurons, bias compensation; `auto` allocation = the global
    AL-AM search on the dense capture (`structure_search`, run by the driver as `flap_search`)."""

    def attention(self, ctx: LayerContext) -> MetricPruner:
        return flap_pruner(ctx.layer.self_attn.o_proj.in_features, ctx.where("o_proj"))

    def ffn(self, ctx: LayerContext) -> MetricPruner:
        return flap_pruner(ctx.n_ffn, ctx.where("down_proj"))
