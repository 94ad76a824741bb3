"""What makes the method comparison fair: allocation chosen independently of the method, O-FANG's
layer-wide compensation, and the per-block diagnostics recorded in prune.json."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_reloads_identically, captured, tiny_model
from fang.analysis.cluster import relevance_weights
from fang.core.choices import Variant, parse_variant, resolve_allocation
from fang.core.errors import FangError
from fang.methods.driver import prune_model
from fang.methods.function_aware import FangLayerPruner, own_cluster_weight, plan_groups
from fang.methods.plan import flap_plan_from_capture
from fang.methods.units import AttentionUnits, PruneOptions, attention_units
from fang.model.modeling import count_block_params
from test_fang_prune import K, _data, make_fang_inputs


def test_parse_variant_and_defaults():
    assert parse_variant("obc+fc") == Variant("obc", "fc", "group")
    assert parse_variant("o_fang+layer") == Variant("o_fang", "auto", "layer")
    assert parse_variant("o_fang+uniform+layer").name == "o_fang+uniform+layer"
    # parts not named keep the prune.* values they are given
    assert parse_variant("flap", allocation="uniform") == Variant("flap", "uniform", "group")
    with pytest.raises(FangError, match="neither an allocation"):
        parse_variant("obc+fastest")
    with pytest.raises(FangError, match="unknown method"):
        parse_variant("sparsegpt+fc")
    with pytest.raises(FangError, match="applies to o_fang, sobp only"):
        parse_variant("obc+layer")


def test_auto_allocation_is_each_papers_own():
    assert resolve_allocation("flap", "auto") == "flap_search"
    assert resolve_allocation("o_fang", "auto") == resolve_allocation("f_fang", "auto") == "asa"
    assert resolve_allocation("obc", "auto") == resolve_allocation("wanda_sp", "auto") == "uniform"
    assert resolve_allocation("obc", "flap_search") == "flap_search"


def test_obc_with_flap_search_keeps_flaps_structure(calib, tmp_path):
    model = tiny_model(6, 3, layers=3)
    cap = captured(model, calib, tmp_path)
    units = attention_units(model.config, "kv_group")
    keep_attn, keep_mlp = flap_plan_from_capture(model, cap, 0.3, units)
    report = prune_model(model, cap, "obc", 0.3, options=PruneOptions(allocation="flap_search"))
    assert [e["kv_heads"] for e in report.layers] == keep_attn
    assert [e["ffn"] for e in report.layers] == keep_mlp
    assert report.options["allocation"] == "flap_search"
    assert_reloads_identically(model, calib, tmp_path)


@pytest.mark.parametrize("method", ["flap", "obc", "o_fang"])
def test_per_block_allocation_for_any_method(method, calib, tmp_path):
    # "FLAP at a uniform structure", "OBC + ASA", "FANG without ASA": one option each
    model = tiny_model(4, 4, layers=2)
    cap = captured(model, calib, tmp_path)
    dense = count_block_params(model)
    inputs = make_fang_inputs(cap, [0.3, 0.3]) if method == "o_fang" else None
    per_block = [0.1, 0.5]
    report = prune_model(model, cap, method, 0.3, options=PruneOptions(tau=1.0, block_sparsity=per_block,
                                                                        allocation="fc"), inputs=inputs)
    neuron = 3 * model.config.hidden_size
    bias = 2 * model.config.hidden_size if method == "flap" else 0  # FLAP's compensation biases
    for layer, s in zip(model.model.layers, per_block):
        removed = dense // 2 - sum(p.numel() for p in layer.parameters())
        assert abs(removed + bias - s * dense / 2) <= neuron / 2
    assert report.layers[0]["ffn"] > report.layers[1]["ffn"]


def test_layer_compensation_refits_every_kept_column_by_least_squares():
    """compensation=layer: same neurons as group-wise selection; the kept columns of the whole layer
    (shared group included) are the plain least-squares refit of the dense output."""
    x, labels, w = _data(n=16, t=150, seed=6)
    ids = torch.arange(16) % (K + 1)
    alpha = relevance_weights(torch.tensor([[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]]), tau=0.7)
    groups = plan_groups(ids, K, alpha, 5)
    sel = {}
    for comp in ("group", "layer"):
        pruner = FangLayerPruner("obc", groups, ids, K, damp=0.0, compensation=comp)
        pruner.add_batch(x[:70], labels[:70])
        pruner.add_batch(x[70:], labels[70:])
        sel[comp] = pruner.select(w)
    assert torch.equal(sel["group"].keep, sel["layer"].keep)
    keep = sel["layer"].keep
    fit = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    torch.testing.assert_close(sel["layer"].weight[:, keep], fit, rtol=1e-7, atol=1e-9)
    gone = torch.ones(16, dtype=torch.bool)
    gone[keep] = False
    assert torch.equal(sel["layer"].weight[:, gone], torch.zeros(5, int(gone.sum()), dtype=torch.float64))
    # least squares over all kept columns can only lower the plain reconstruction error
    err = {c: float((x @ w.T - x @ s.weight.T).square().sum()) for c, s in sel.items()}
    assert err["layer"] <= err["group"]
    # the shared group (id K) is refit too, which group-wise compensation never does
    assert not torch.equal(sel["layer"].weight[:, ids == K], w[:, ids == K])
    assert sel["layer"].info["compensation"] == "layer"


def test_o_fang_layer_compensation_end_to_end(calib, tmp_path):
    model = tiny_model(6, 3, layers=2)
    cap = captured(model, calib, tmp_path, batch_size=3)
    inputs = make_fang_inputs(cap, [0.3, 0.3])
    reports = {}
    for comp in ("group", "layer"):
        m = tiny_model(6, 3, layers=2)
        reports[comp] = prune_model(m, cap, "o_fang", 0.3, options=PruneOptions(tau=1.0, compensation=comp),
                                    inputs=inputs)
        if comp == "layer":
            assert_reloads_identically(m, calib, tmp_path)
    # same neurons in block 0 (identical inputs there); the refit differs
    assert reports["group"].layers[0]["groups_removed"] == reports["layer"].layers[0]["groups_removed"]
    assert reports["layer"].options["compensation"] == "layer"


def test_reconstruction_error_is_recorded_and_exact_when_nothing_is_removed(calib, tmp_path):
    model = tiny_model(4, 4, layers=2)
    cap = captured(model, calib, tmp_path)
    # block 0 keeps everything, block 1 loses half: its error must be positive, block 0's zero
    report = prune_model(model, cap, "obc", 0.25, options=PruneOptions(block_sparsity=[0.0, 0.5]))
    e0, e1 = report.layers[0]["relative_error"], report.layers[1]["relative_error"]
    assert e0 == {"o_proj": 0.0, "down_proj": 0.0}
    assert 0.0 < e1["o_proj"] < 1.5 and 0.0 < e1["down_proj"] < 1.5


def test_own_cluster_weight():
    alpha = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    counts = torch.tensor([10, 30])
    # group 0: 0.5*10 / (0.5*10 + 0.5*30) = 0.25; group 1: 0.1*30 / (0.9*10 + 0.1*30) = 0.25
    assert own_cluster_weight(alpha, counts) == pytest.approx([0.25, 0.25])
    assert own_cluster_weight(torch.eye(2, dtype=torch.float64), torch.tensor([5, 5])) == pytest.approx([1.0, 1.0])


def test_fang_records_own_cluster_weight_per_group(calib, tmp_path):
    model = tiny_model(4, 4, layers=1)
    cap = captured(model, calib, tmp_path, batch_size=3)
    report = prune_model(model, cap, "f_fang", 0.3, options=PruneOptions(tau=1.0),
                         inputs=make_fang_inputs(cap, [0.3]))
    own = report.layers[0]["own_cluster_weight"]
    assert len(own) == K and all(1.0 / K - 1e-9 <= v <= 1.0 for v in own)  # softmax(-d/tau) favours its own cluster
    assert report.as_dict()["empty_clusters"] == 0


def test_attention_units_describe_kv_groups():
    units = AttentionUnits("kv_group", n_heads=9, n_kv=3, head_dim=64, hidden=576)
    assert units.unit_columns().shape == (3, 3 * 64)
