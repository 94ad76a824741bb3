"""Methods ica_fn, ica_fn_ranked and gprune through the sequential driver: what they keep, real shrinking,
identical logits after reloading, and their errors."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_reloads_identically, captured, tiny_model
from fang.analysis.ica import prunable_layers
from fang.core.choices import parse_variant, resolve_allocation
from fang.core.errors import FangError
from fang.methods.driver import PruneOptions, prune_model
from fang.methods.gprune import GPruneInputs, layer_keep, module_keep_counts
from fang.methods.ica_fn import IcaInputs
from fang.methods.plan import neurons_to_remove
from fang.model.modeling import count_block_params


def _kept_neurons(dense, pruned, li):
    """Dense neuron ids a pruned block kept: up_proj rows are copied untouched by every method."""
    up_d = dense.model.layers[li].mlp.up_proj.weight.detach()
    return [int(torch.nonzero((up_d == row).all(1))[0]) for row in pruned.model.layers[li].mlp.up_proj.weight.detach()]


def _scores(n_layers, n=64, seed=0):
    return torch.rand(n_layers, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 6


def test_ica_fn_faithful_prunes_the_key_set_from_inner_blocks_only_and_reloads(calib, tmp_path):
    model, dense = tiny_model(6, 3, layers=7), tiny_model(6, 3, layers=7)
    cap = captured(model, calib, tmp_path, batch_size=3)
    scores = _scores(7)
    n_remove = neurons_to_remove(dense, 0.1)
    report = prune_model(model, cap, "ica_fn", 0.1, batch_size=4, inputs=IcaInputs(scores))
    assert report.options["allocation"] == "ica_threshold"
    inner = prunable_layers(7)
    assert inner == [3, 4]
    t = report.layers[inner[0]]["ica_threshold"]
    removed = 0
    for li, (d, p, entry) in enumerate(zip(dense.model.layers, model.model.layers, report.layers)):
        assert entry["kv_heads"] == 3 and entry["heads"] == 6  # FFN only: every head stays
        assert p.self_attn.o_proj.bias is None and torch.equal(p.self_attn.o_proj.weight, d.self_attn.o_proj.weight)
        if li in inner:
            kept = _kept_neurons(dense, model, li)
            assert kept == torch.nonzero(scores[li] > t).reshape(-1).tolist()  # exactly the key neurons at T
            assert p.mlp.down_proj.bias is not None  # FLAP-style bias compensation of down_proj
            removed += 64 - len(kept)
        else:
            assert entry["dense_edge"] and entry["ffn"] == 64 and p.mlp.down_proj.bias is None
            assert all(torch.equal(a, b) for a, b in zip(p.state_dict().values(), d.state_dict().values()))
    assert removed == n_remove  # the bisection hits the target number of neurons exactly
    assert report.pruned_block_params == count_block_params(model)
    assert_reloads_identically(model, calib, tmp_path)


def test_ica_fn_faithful_takes_no_allocation_and_needs_inner_blocks(calib, tmp_path):
    with pytest.raises(FangError, match="chooses its keep counts itself"):
        parse_variant("ica_fn+uniform")
    with pytest.raises(FangError, match="chooses its keep counts itself"):
        resolve_allocation("ica_fn", "fc")
    assert parse_variant("ica_fn", allocation="fc").allocation == "auto"  # prune.allocation does not reach it
    assert parse_variant("ica_fn_ranked+fc").allocation == "fc"
    model = tiny_model(4, 4, layers=3)
    cap = captured(model, calib, tmp_path)
    with pytest.raises(FangError, match="no block outside the dense edges"):
        prune_model(model, cap, "ica_fn", 0.2, inputs=IcaInputs(_scores(3)))
    with pytest.raises(FangError, match="needs the ICA maps"):
        prune_model(model, cap, "ica_fn_ranked", 0.2)
    with pytest.raises(FangError, match="neuron_score is \\(2, 64\\)"):
        prune_model(model, cap, "ica_fn_ranked", 0.2, inputs=IcaInputs(_scores(2)))


@pytest.mark.parametrize("scheme", ["kv_group", "query_slot"])
def test_ica_fn_ranked_keeps_the_top_scores_under_the_shared_allocation_and_reloads(scheme, calib, tmp_path):
    model, dense = tiny_model(6, 3, layers=2), tiny_model(6, 3, layers=2)
    flap_model = tiny_model(6, 3, layers=2)
    cap = captured(model, calib, tmp_path, batch_size=3)
    scores = _scores(2)
    report = prune_model(model, cap, "ica_fn_ranked", 0.3, scheme, batch_size=4, inputs=IcaInputs(scores))
    ref = prune_model(flap_model, cap, "flap", 0.3, scheme, batch_size=4, options=PruneOptions(allocation="uniform"))
    for li, (entry, e_flap) in enumerate(zip(report.layers, ref.layers)):
        # the same structure and heads as flap+uniform: only the FFN ranking differs
        assert (entry["heads"], entry["kv_heads"], entry["ffn"]) == (e_flap["heads"], e_flap["kv_heads"], e_flap["ffn"])
        top = torch.sort(torch.argsort(scores[li], descending=True)[: entry["ffn"]]).values.tolist()
        assert _kept_neurons(dense, model, li) == top
        layer = model.model.layers[li]
        assert layer.mlp.down_proj.bias is not None and layer.self_attn.o_proj.bias is not None
    assert abs(report.achieved_sparsity - ref.achieved_sparsity) < 1e-9
    assert_reloads_identically(model, calib, tmp_path)


def _gprune_inputs(n_layers, n=64, m=5, metric="wanda_sp", seed=0):
    g = torch.Generator().manual_seed(seed)
    modules = torch.stack([torch.randperm(n, generator=g) % m for _ in range(n_layers)])
    drift = torch.rand(n_layers, 8, generator=g, dtype=torch.float64) * 0.3
    drift[:, m:] = float("nan")  # unused module slots, as the stage stores them
    switched = torch.zeros(n_layers, 8, dtype=torch.bool)
    switched[:, 1] = True
    return GPruneInputs(modules, torch.rand(n_layers, n, generator=g, dtype=torch.float64), drift, switched, metric,
                        module_gamma=0.2, max_sparsity=0.9)


@pytest.mark.parametrize("metric", ["wanda_sp", "flap"])
def test_gprune_keeps_module_budgets_and_reloads(metric, calib, tmp_path):
    model, dense = tiny_model(6, 3, layers=2), tiny_model(6, 3, layers=2)
    base_model = tiny_model(6, 3, layers=2)
    cap = captured(model, calib, tmp_path, batch_size=3)
    inputs = _gprune_inputs(2, metric=metric)
    report = prune_model(model, cap, "gprune", 0.3, batch_size=4, inputs=inputs)
    base = "wanda_sp" if metric == "wanda_sp" else "flap"
    ref = prune_model(base_model, cap, base, 0.3, batch_size=4, options=PruneOptions(allocation="uniform"))
    for li, (entry, e_ref) in enumerate(zip(report.layers, ref.layers)):
        assert (entry["heads"], entry["ffn"]) == (e_ref["heads"], e_ref["ffn"])  # heads and counts of the base metric
        kept = torch.tensor(_kept_neurons(dense, model, li))
        mods = inputs.modules[li]
        size = torch.bincount(mods, minlength=5).double()
        counts = module_keep_counts(size, inputs.module_drift[li][:5], entry["ffn"], 0.2, 0.9)
        assert torch.bincount(mods[kept], minlength=5).tolist() == counts.long().tolist()  # module budgets
        # the switched module (1) ranks by the stage's weight-magnitude score; the others by the running metric
        in_1 = torch.nonzero(mods == 1).reshape(-1)
        top = in_1[inputs.score[li][in_1].argsort(descending=True)[: int(counts[1])]]
        assert sorted(kept[mods[kept] == 1].tolist()) == sorted(top.tolist())
        assert entry["modules"] == 5 and entry["switched_modules"] == 1
        layer = model.model.layers[li]
        assert (layer.mlp.down_proj.bias is not None) == (metric == "flap")
        assert (layer.self_attn.o_proj.bias is not None) == (metric == "flap")
    assert_reloads_identically(model, calib, tmp_path)


@pytest.mark.parametrize("metric", ["wanda_sp", "flap"])
def test_gprune_with_one_module_and_no_switch_is_its_baseline(metric, calib, tmp_path):
    # everything gprune adds (modules, switch, module sparsity) switched off: the same neurons, heads and
    # weights as the baseline, which ranks by the same running statistic of the sequential pass
    model, base_model = tiny_model(6, 3, layers=2), tiny_model(6, 3, layers=2)
    cap = captured(model, calib, tmp_path, batch_size=3)
    n = model.model.layers[0].mlp.down_proj.in_features
    inputs = GPruneInputs(torch.zeros(2, n, dtype=torch.long), torch.rand(2, n, dtype=torch.float64),
                          torch.full((2, 8), float("nan"), dtype=torch.float64).index_fill_(1, torch.tensor([0]), 0.1),
                          torch.zeros(2, 8, dtype=torch.bool), metric, module_gamma=0.0, max_sparsity=0.9)
    prune_model(model, cap, "gprune", 0.3, batch_size=4, inputs=inputs)
    prune_model(base_model, cap, metric, 0.3, batch_size=4, options=PruneOptions(allocation="uniform"))
    for (name, a), (_, b) in zip(model.state_dict().items(), base_model.state_dict().items()):
        assert a.shape == b.shape and torch.equal(a, b), name


def test_gprune_needs_its_modules(calib, tmp_path):
    model = tiny_model(4, 4, layers=2)
    cap = captured(model, calib, tmp_path)
    with pytest.raises(FangError, match="needs the GPrune modules"):
        prune_model(model, cap, "gprune", 0.3)
    with pytest.raises(FangError, match="gprune.zarr modules is \\(3, 64\\)"):
        prune_model(model, cap, "gprune", 0.3, inputs=_gprune_inputs(3))
