"""FLAP building blocks: streaming statistics, fluctuation scores, structure search, compensation."""

from __future__ import annotations

import pytest
import torch

from fang.core.errors import FangError
from fang.methods.base import select_top
from fang.methods.flap import al_am_scores, bias_compensation, fluctuation_metric, head_scores, standardize
from fang.methods.plan import param_matched_structure, structure_search, uniform_structure
from fang.methods.stats import InputStats
from fang.methods.units import group_scores, slot_scores


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


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5])  # (at 0.8 the per-layer floors bind)
def test_structure_search_hits_target(sparsity):
    attn, mlp = _layer_scores()
    a_cost, n_cost = 96, 3
    keep_a, keep_m = structure_search(attn, mlp, sparsity, a_cost, n_cost)
    assert len(keep_a) == len(keep_m) == 4
    total = sum(s.numel() for s in attn) * a_cost + sum(s.numel() for s in mlp) * n_cost
    kept = sum(keep_a) * a_cost + sum(keep_m) * n_cost
    target = (1 - sparsity) * total
    # FLAP's threshold: the unit whose cumulative cost is closest to the target, itself dropped
    assert target - 1.5 * a_cost <= kept <= target + 0.5 * a_cost
    assert all(1 <= k <= 8 for k in keep_a) and all(1 <= k <= 64 for k in keep_m)


def _official_al_am(o_metrics, d_metrics, head_dim, ratio, head_weight):
    """FLAP's prune_flap AL-AM block (CASIA-IVA-Lab/FLAP lib/prune.py), transcribed on small tensors."""
    attn_metric = torch.stack([m**2 for m in o_metrics])
    std = lambda x: (x - torch.mean(x, axis=1, keepdim=True)) / torch.std(x, axis=1, keepdim=True)  # noqa: E731
    attn_metric = std(attn_metric).reshape(len(o_metrics), -1, head_dim).mean(dim=2)
    mlp_metric = std(torch.stack(d_metrics))
    prune_metric = torch.cat([attn_metric.view(-1), mlp_metric.view(-1)])
    sorted_prune, indices = torch.sort(prune_metric, descending=True)
    compression_weight = torch.ones_like(indices, dtype=torch.float64)
    compression_weight[indices < attn_metric.numel()] = head_weight
    threshold = sorted_prune[
        torch.argmin(torch.abs(torch.cumsum(compression_weight, 0) - torch.sum(compression_weight) * (1 - ratio)))
    ]
    return (attn_metric > threshold).sum(1).tolist(), (mlp_metric > threshold).sum(1).tolist()


@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5])
def test_al_am_matches_flaps_official_formula(ratio):
    # 3 layers, 4 heads of 8 channels, 40 neurons; metrics with layer-dependent scales and outliers
    g = torch.Generator().manual_seed(1)
    n_layers, n_heads, head_dim, n_ffn, hidden = 3, 4, 8, 40, 32
    o_metrics = [torch.rand(n_heads * head_dim, generator=g, dtype=torch.float64) * 10.0 ** i for i in range(n_layers)]
    d_metrics = [torch.rand(n_ffn, generator=g, dtype=torch.float64) ** (i + 1) for i in range(n_layers)]
    head_params, neuron_params = 4 * head_dim * hidden, 3 * hidden
    expect_a, expect_m = _official_al_am(o_metrics, d_metrics, head_dim, ratio, head_params / neuron_params)
    heads = torch.arange(n_heads * head_dim).reshape(n_heads, head_dim)  # MHA: a unit is one head
    scores = [al_am_scores(o, d, heads) for o, d in zip(o_metrics, d_metrics)]
    keep_a, keep_m = structure_search([a for a, _ in scores], [m for _, m in scores], ratio, head_params, neuron_params)
    assert (keep_a, keep_m) == (expect_a, expect_m)


def test_al_am_gqa_group_score_is_mean_of_its_heads():
    # a KV group's score is the mean z over its channels = the mean of its query heads' FLAP scores
    g = torch.Generator().manual_seed(2)
    o = torch.rand(6 * 4, generator=g, dtype=torch.float64)
    heads = torch.arange(24).reshape(6, 4)
    groups = torch.arange(24).reshape(3, 8)  # 3 KV groups of 2 query heads (heads 2g, 2g+1)
    head_s, _ = al_am_scores(o, torch.rand(5, dtype=torch.float64), heads)
    group_s, _ = al_am_scores(o, torch.rand(5, dtype=torch.float64), groups)
    assert torch.allclose(group_s, head_s.reshape(3, 2).mean(1))
    # the channels, not the 3 group means, are standardized: three equally important groups (same
    # channel values, permuted) score 0 instead of being forced to z = -1, 0, +1
    pattern = torch.rand(8, generator=g, dtype=torch.float64)
    same = torch.cat([pattern[torch.randperm(8, generator=g)] for _ in range(3)])
    equal_s, _ = al_am_scores(same, torch.rand(5, dtype=torch.float64), groups)
    assert torch.allclose(equal_s, torch.zeros(3, dtype=torch.float64), atol=1e-12)


def test_al_am_squares_attention_metric_only():
    o = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    d = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    a, m = al_am_scores(o, d, torch.arange(4).reshape(4, 1))
    assert torch.allclose(m, standardize(d))
    assert torch.allclose(a, standardize(o**2))
    assert not torch.allclose(a, m)  # squaring changes the spacing, so the z-scores differ


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


def test_al_am_is_scale_invariant_per_layer():
    # FLAP z-scores within a layer: multiplying one layer's metric by 1000 must change nothing
    g = torch.Generator().manual_seed(3)
    o = [torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4)]
    d = [torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4)]
    units = torch.arange(16).reshape(4, 4)

    def search(o, d):
        scores = [al_am_scores(oi, di, units) for oi, di in zip(o, d)]
        return structure_search([a for a, _ in scores], [m for _, m in scores], 0.4, 96, 3)

    base = search(o, d)
    assert search([x * (1000.0 if i == 2 else 1.0) for i, x in enumerate(o)],
                  [x * (50.0 if i == 1 else 1.0) for i, x in enumerate(d)]) == base


def test_structure_search_prefers_layers_with_high_relative_scores():
    # one layer whose neuron scores are mostly low with a few outliers keeps fewer neurons
    attn = [standardize(torch.arange(4.0)), standardize(torch.arange(4.0))]
    skewed = torch.cat([torch.zeros(60), torch.full((4,), 10.0)])
    mlp = [standardize(torch.linspace(0, 1, 64)), standardize(skewed)]
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
