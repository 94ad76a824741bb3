"""FLAP building blocks: streaming statistics, fluctuation scores, structure search, compensation."""

from __future__ import annotations

import pytest
import torch

from fang.errors import FangError
from fang.flap import (
    InputStats,
    bias_compensation,
    fluctuation_metric,
    group_scores,
    head_scores,
    select_top,
    slot_scores,
    structure_search,
    param_matched_structure,
    uniform_structure,
)


def _batches(seed: int = 0, offset: float = 1000.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # different leading shapes, and a large common offset: a naive sum-of-squares variance
    # would lose most digits here
    shapes = [(3, 5, 6), (7, 6), (2, 1, 4, 6), (1, 6)]
    return [offset + torch.randn(*s, generator=g) * torch.linspace(0.5, 3.0, 6) for s in shapes]


def test_input_stats_match_direct_computation():
    batches = _batches()
    stats = InputStats()
    for x in batches:
        stats.add_batch(x)
    flat = torch.cat([x.reshape(-1, 6) for x in batches]).double()
    assert stats.count == flat.shape[0]
    assert stats.mean.dtype == torch.float64
    torch.testing.assert_close(stats.mean, flat.mean(0), rtol=0, atol=1e-10)
    torch.testing.assert_close(stats.variance, flat.var(0, unbiased=False), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(stats.sum, flat.sum(0), rtol=1e-12, atol=1e-8)
    torch.testing.assert_close(stats.sum_sq, flat.square().sum(0), rtol=1e-12, atol=1e-6)


def test_input_stats_weighted_match_direct_computation():
    batches = _batches(seed=1)
    g = torch.Generator().manual_seed(2)
    weights = [torch.rand(x.shape[:-1], generator=g) for x in batches]
    weights[1] = torch.zeros_like(weights[1])  # a batch with no weight must not move anything
    stats = InputStats()
    for x, w in zip(batches, weights):
        stats.add_batch(x, weights=w)
    flat = torch.cat([x.reshape(-1, 6) for x in batches]).double()
    w = torch.cat([w.reshape(-1) for w in weights]).double()
    mean = (w[:, None] * flat).sum(0) / w.sum()
    var = (w[:, None] * (flat - mean).square()).sum(0) / w.sum()
    assert stats.count == flat.shape[0]
    assert stats.weight_sum == pytest.approx(float(w.sum()))
    torch.testing.assert_close(stats.mean, mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(stats.variance, var, rtol=1e-9, atol=1e-9)


def test_integer_weights_equal_repeated_tokens():
    x = torch.randn(10, 4)
    reps = torch.tensor([1, 0, 3, 2, 1, 1, 0, 5, 2, 1])
    weighted, repeated = InputStats(), InputStats()
    weighted.add_batch(x, weights=reps.float())
    repeated.add_batch(x.repeat_interleave(reps, dim=0))
    torch.testing.assert_close(weighted.mean, repeated.mean)
    torch.testing.assert_close(weighted.variance, repeated.variance)


def test_input_stats_merge_equals_one_stream():
    batches = _batches(seed=3)
    whole, a, b = InputStats(), InputStats(), InputStats()
    for i, x in enumerate(batches):
        whole.add_batch(x)
        (a if i % 2 else b).add_batch(x)
    a.merge(b)
    assert a.count == whole.count
    torch.testing.assert_close(a.mean, whole.mean)
    torch.testing.assert_close(a.variance, whole.variance)


def test_input_stats_errors():
    stats = InputStats()
    with pytest.raises(FangError, match="no"):
        _ = stats.mean
    stats.add_batch(torch.randn(4, 3))
    with pytest.raises(FangError, match="channels"):
        stats.add_batch(torch.randn(4, 5))
    with pytest.raises(FangError, match="nonnegative"):
        stats.add_batch(torch.randn(4, 3), weights=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(FangError, match="leading shape"):
        stats.add_batch(torch.randn(4, 3), weights=torch.ones(5))
    assert stats.count == 4  # rejected batches left no trace


def test_fluctuation_metric_is_variance_times_column_norm():
    w = torch.randn(7, 5)
    var = torch.rand(5, dtype=torch.float64)
    expected = var * (w.double() ** 2).sum(0)
    torch.testing.assert_close(fluctuation_metric(w, var), expected)
    with pytest.raises(FangError, match="channels"):
        fluctuation_metric(w, torch.rand(4))


def test_head_group_slot_layout():
    hs = head_scores(torch.arange(12, dtype=torch.float64), head_dim=2)
    torch.testing.assert_close(hs, torch.tensor([0.5, 2.5, 4.5, 6.5, 8.5, 10.5], dtype=torch.float64))
    # 6 query heads over 3 KV heads: groups {0,1}, {2,3}, {4,5}; slot s = heads {s, 2+s, 4+s}
    heads = torch.arange(6, dtype=torch.float64)
    torch.testing.assert_close(group_scores(heads, 3), torch.tensor([0.5, 2.5, 4.5], dtype=torch.float64))
    torch.testing.assert_close(slot_scores(heads, 3), torch.tensor([2.0, 3.0], dtype=torch.float64))
    with pytest.raises(FangError):
        head_scores(torch.ones(10), head_dim=4)
    with pytest.raises(FangError):
        group_scores(heads, 4)


def test_select_top_sorted_with_stable_ties():
    scores = torch.tensor([0.5, 2.0, 1.0, 2.0, 1.0, -3.0])
    assert select_top(scores, 3).tolist() == [1, 2, 3]  # ties at 1.0: index 2 beats index 4
    assert select_top(scores, 0).tolist() == []
    assert select_top(scores, 6).tolist() == list(range(6))
    assert select_top(scores, 2).dtype == torch.long
    with pytest.raises(FangError):
        select_top(scores, 7)


def test_bias_compensation_preserves_mean_output():
    torch.manual_seed(0)
    dense = torch.nn.Linear(16, 8)
    x = 2.0 + torch.randn(64, 8, 16) * torch.linspace(0.1, 2.0, 16)
    stats = InputStats()
    for chunk in x.split(16):
        stats.add_batch(chunk)
    keep = torch.tensor([0, 2, 3, 7, 8, 11, 15])
    comp = bias_compensation(dense.weight, stats.mean, keep)
    assert comp.shape == (8,) and comp.dtype == dense.weight.dtype

    pruned = torch.nn.Linear(len(keep), 8)
    with torch.no_grad():
        pruned.weight.copy_(dense.weight[:, keep])
        pruned.bias.copy_(dense.bias + comp)
        dense_mean = dense(x).reshape(-1, 8).mean(0)
        pruned_mean = pruned(x[..., keep]).reshape(-1, 8).mean(0)
        uncompensated = (pruned(x[..., keep]) - comp).reshape(-1, 8).mean(0)
    torch.testing.assert_close(pruned_mean, dense_mean, rtol=0, atol=1e-5)
    assert (uncompensated - dense_mean).abs().max() > 0.1  # the compensation is doing real work


def test_bias_compensation_keep_all_is_zero():
    w = torch.randn(4, 6)
    assert torch.equal(bias_compensation(w, torch.randn(6), torch.arange(6)), torch.zeros(4))


def _layer_scores(n_layers=4, n_attn=8, n_mlp=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = [torch.rand(n_attn, generator=g) * (i + 1) for i in range(n_layers)]
    mlp = [torch.rand(n_mlp, generator=g) ** (i + 1) for i in range(n_layers)]
    return attn, mlp


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.8])
def test_structure_search_hits_target(sparsity):
    attn, mlp = _layer_scores()
    a_cost, n_cost = 96, 3
    keep_a, keep_m = structure_search(attn, mlp, sparsity, a_cost, n_cost)
    assert len(keep_a) == len(keep_m) == 4
    total = sum(s.numel() for s in attn) * a_cost + sum(s.numel() for s in mlp) * n_cost
    kept = sum(keep_a) * a_cost + sum(keep_m) * n_cost
    target = (1 - sparsity) * total
    assert target <= kept < target + a_cost
    assert all(1 <= k <= 8 for k in keep_a) and all(1 <= k <= 64 for k in keep_m)


def test_structure_search_keeps_everything_at_zero_sparsity():
    attn, mlp = _layer_scores()
    keep_a, keep_m = structure_search(attn, mlp, 0.0, 96, 3)
    assert keep_a == [8] * 4 and keep_m == [64] * 4


def test_structure_search_respects_minimums():
    attn, mlp = _layer_scores()
    unclamped_a, unclamped_m = structure_search(attn, mlp, 0.97, 96, 3)
    assert min(unclamped_a) < 3 and min(unclamped_m) < 10  # so the minimums below really bind
    keep_a, keep_m = structure_search(attn, mlp, 0.97, 96, 3, min_attn_units=3, min_neurons=10)
    assert min(keep_a) >= 3 and min(keep_m) >= 10
    assert all(k == max(u, 3) for k, u in zip(keep_a, unclamped_a))
    with pytest.raises(FangError, match="runnable"):
        structure_search(attn, mlp, 0.5, 96, 3, min_attn_units=0)


def test_structure_search_is_scale_invariant_per_layer():
    # FLAP z-scores within a layer: multiplying one layer's scores by 1000 must change nothing
    attn, mlp = _layer_scores()
    base = structure_search(attn, mlp, 0.4, 96, 3)
    scaled_attn = [s * (1000.0 if i == 2 else 1.0) for i, s in enumerate(attn)]
    scaled_mlp = [s + (50.0 if i == 1 else 0.0) for i, s in enumerate(mlp)]
    assert structure_search(scaled_attn, scaled_mlp, 0.4, 96, 3) == base


def test_structure_search_prefers_layers_with_high_relative_scores():
    # one layer whose neuron scores are mostly low with a few outliers keeps fewer neurons
    attn = [torch.arange(4.0), torch.arange(4.0)]
    skewed = torch.cat([torch.zeros(60), torch.full((4,), 10.0)])
    mlp = [torch.linspace(0, 1, 64), skewed]
    _, keep_m = structure_search(attn, mlp, 0.5, 10, 1)
    assert keep_m[1] < keep_m[0]


def test_structure_search_errors():
    attn, mlp = _layer_scores()
    with pytest.raises(FangError, match="sparsity"):
        structure_search(attn, mlp, 1.0, 96, 3)
    with pytest.raises(FangError):
        structure_search(attn, mlp[:2], 0.5, 96, 3)
    with pytest.raises(FangError, match="finite"):
        structure_search([torch.tensor([1.0, float("nan")])], [torch.ones(3)], 0.5, 1, 1)


def test_uniform_structure():
    keep_a, keep_m = uniform_structure([4, 8], [64, 100], 0.5, 0.25)
    assert keep_a == [2, 4] and keep_m == [48, 75]
    keep_a, keep_m = uniform_structure([4, 8], [64, 100], [0.0, 0.3], [0.9, 1.0])
    assert keep_a == [4, 6]  # 8 * 0.7 = 5.6 rounds to 6
    assert keep_m == [6, 1]  # 64 * 0.1 = 6.4 -> 6; a fully pruned MLP is held at the minimum
    keep_a, _ = uniform_structure([4], [8], 1.0, 0.0, min_attn_units=2)
    assert keep_a == [2]
    with pytest.raises(FangError):
        uniform_structure([4, 4], [8, 8], [0.1], 0.1)


def test_param_matched_structure_lets_the_ffn_absorb_head_rounding():
    # SmolLM2-135M's block: 3 KV groups of 294,912 params, 1,536 neurons of 1,728, 1,152 norm params
    unit, neuron, n_ffn = 294_912, 1_728, 1_536
    block = 3 * unit + n_ffn * neuron + 1_152
    keep_a, keep_m = param_matched_structure([3, 3, 3], [n_ffn] * 3, [0.2, 0.4, 0.0], unit, neuron, [block] * 3)
    assert keep_a == [2, 2, 3]  # 3 * 0.8 = 2.4 and 3 * 0.6 = 1.8 both round to 2 groups
    for s, ka, km in zip([0.2, 0.4, 0.0], keep_a, keep_m):
        removed = (3 - ka) * unit + (n_ffn - km) * neuron
        assert abs(removed - s * block) <= neuron / 2
    assert keep_m[2] == n_ffn
    # plain rounding of both would remove only 38.3% of a block at 40%
    ua, um = uniform_structure([3], [n_ffn], 0.4, 0.4)
    assert (3 - ua[0]) * unit + (n_ffn - um[0]) * neuron < 0.39 * block
    # the FFN cannot go below its minimum, nor grow when the heads overshoot
    _, km = param_matched_structure([1], [4], 0.9, 100, 1, [104], min_neurons=1)
    assert km == [1]  # the one head is kept (minimum 1): the FFN would need 94 neurons, it stops at its minimum
    _, km = param_matched_structure([2], [4], 0.5, 100, 10, [240])
    assert km == [2]  # 1 head (100) + 2 neurons (20) = 120 = 50%
    with pytest.raises(FangError, match="block sizes"):
        param_matched_structure([3], [8], 0.3, 1, 1, [10, 10])
