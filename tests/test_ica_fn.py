"""ICA functional networks: planted sources are recovered, thresholds are exact, decisions follow the paper."""

from __future__ import annotations

import pytest
import torch

from fang.analysis.ica import canica, key_neurons, neuron_score, prunable_layers, zscore_columns
from fang.core.errors import FangError
from fang.methods.ica_fn import layer_decision
from fang.methods.plan import bisect_threshold, faithful_masks


def planted(n_tok: int = 600, n_ffn: int = 150, k: int = 4, seed: int = 0):
    """Signals [T, 2n] mixing k sparse spatial maps (disjoint supports of 12 columns) with random time courses."""
    g = torch.Generator().manual_seed(seed)
    c = 2 * n_ffn
    maps = torch.zeros(k, c, dtype=torch.float64)
    support = torch.randperm(c, generator=g)[: 12 * k].view(k, 12)
    for i in range(k):
        maps[i, support[i]] = 2.0 + torch.rand(12, generator=g, dtype=torch.float64)
    courses = torch.randn(n_tok, k, generator=g, dtype=torch.float64)
    noise = 0.05 * torch.randn(n_tok, c, generator=g, dtype=torch.float64)
    return (courses @ maps + noise).float(), maps, support


def test_zscore_columns_gives_zero_mean_unit_std_and_keeps_constant_columns_finite():
    x = torch.randn(50, 6) * torch.arange(1, 7) + 3.0
    x[:, 2] = 7.0
    z = zscore_columns(x)
    assert torch.allclose(z.mean(0), torch.zeros(6), atol=1e-5)
    assert torch.allclose(z[:, [0, 1, 3, 4, 5]].std(0), torch.ones(5), atol=1e-5)
    assert torch.equal(z[:, 2], torch.zeros(50))
    zscore_columns(x, out=x)
    assert torch.allclose(x, z)


def test_canica_recovers_planted_spatial_maps():
    signals, truth, support = planted()
    res = canica(zscore_columns(signals), n_components=4, n_restarts=3, seed=0)
    assert res.maps.shape == (4, 300)
    # z-scoring gives the 252 noise-only columns unit variance too: the 4 components hold the 48 signal columns
    assert 0.9 * 48 / 300 < res.explained_variance < 1.1 * 48 / 300
    corr = torch.corrcoef(torch.cat([res.maps.double(), truth]))[:4, 4:].abs()
    # every planted map is matched by exactly one component, and closely
    assert corr.max(0).values.min() > 0.95
    assert sorted(corr.argmax(0).tolist()) == [0, 1, 2, 3]
    # key neurons at the paper's kind of threshold are exactly the planted supports (act or up column)
    n = 150
    expected = torch.zeros(n, dtype=torch.bool)
    expected[support.flatten() % n] = True
    assert torch.equal(key_neurons(res.maps, 3.0), expected)


def test_key_neurons_is_the_union_of_act_and_up_and_matches_the_score():
    maps = torch.zeros(2, 8)
    maps[0, 1] = 4.0  # act column of neuron 1
    maps[1, 4 + 2] = -5.0  # up column of neuron 2, negative
    maps[1, 3] = 2.0  # below threshold
    assert key_neurons(maps, 3.0).tolist() == [False, True, True, False]
    assert neuron_score(maps).tolist() == [0.0, 4.0, 5.0, 2.0]
    assert torch.equal(key_neurons(maps, 3.0), neuron_score(maps) > 3.0)


@pytest.mark.parametrize("n_keep", [0, 1, 37, 199, 200])
def test_bisection_hits_the_target_keep_count_exactly(n_keep):
    scores = torch.rand(4, 50, generator=torch.Generator().manual_seed(3)) * 6
    t = bisect_threshold(scores, n_keep)
    assert int((scores > t).sum()) == n_keep


def test_bisection_names_tied_scores():
    with pytest.raises(FangError, match="tied scores"):
        bisect_threshold(torch.ones(10), 5)


def test_faithful_masks_keep_edges_dense_and_remove_exactly_n():
    n_layers, n = 8, 40
    scores = torch.rand(n_layers, n, generator=torch.Generator().manual_seed(1)) * 5
    keep, t = faithful_masks(scores, 70)
    assert prunable_layers(n_layers) == [3, 4, 5]
    assert int((~keep).sum()) == 70
    assert keep[[0, 1, 2, 6, 7]].all()
    assert torch.equal(keep[3:6], scores[3:6] > t)
    with pytest.raises(FangError, match="edge blocks stay dense"):
        faithful_masks(scores, 3 * n)


def test_layer_decision_modes():
    maps = torch.randn(3, 20, generator=torch.Generator().manual_seed(2)) * 2
    assert torch.equal(layer_decision("ranked", 0, 8, maps), neuron_score(maps))
    assert layer_decision("faithful", 1, 8, maps, 2.5).all()  # an edge layer stays dense
    assert torch.equal(layer_decision("faithful", 4, 8, maps, 2.5), key_neurons(maps, 2.5))
    with pytest.raises(FangError, match="use faithful or ranked"):
        layer_decision("union", 4, 8, maps, 2.5)


@pytest.mark.parametrize("n_remove", [0, 70])
def test_the_threshold_plan_counts_the_faithful_masks_and_notes_each_block(n_remove):
    """plan.ica_threshold_plan: every attention unit kept, each block's FFN count that of the faithful mask, and the
    report note per block (dense edge, or the threshold); the method's per-block top neurons are that mask."""
    from fang.methods.ica_fn import top_neurons
    from fang.methods.plan import ica_threshold_plan

    scores = torch.rand(8, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 5
    keep_attn, keep_mlp, notes = ica_threshold_plan(list(scores), n_remove, n_units=3)
    assert keep_attn == [3] * 8
    if n_remove == 0:
        assert keep_mlp == [40] * 8 and [bool(n) for n in notes] == [True] * 3 + [False] * 3 + [True] * 2
        return
    keep, t = faithful_masks(scores, n_remove)
    assert keep_mlp == keep.sum(1).tolist() and sum(keep_mlp) == 8 * 40 - n_remove
    assert notes == [{"dense_edge": True}] * 3 + [{"ica_threshold": round(t, 6)}] * 3 + [{"dense_edge": True}] * 2
    for li in range(8):
        assert torch.equal(top_neurons(scores[li], keep_mlp[li]), keep[li])
