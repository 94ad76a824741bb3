"""The sequential driver on tiny models: FLAP and the baselines (Wanda-sp, magnitude, OBC), real shrinking,
target sparsity, reload, GQA schemes, errors."""

import pytest
import torch

from conftest import assert_reloads_identically, captured, tiny_model
from fang.core.errors import FangError
from fang.methods.driver import prune_model
from fang.methods.magnitude import magnitude_metric, magnitude_pruner
from fang.methods.stats import InputStats
from fang.methods.units import AttentionUnits, PruneOptions
from fang.methods.wanda_sp import wanda_sp_metric, wanda_sp_pruner
from fang.model.modeling import count_block_params


@pytest.mark.parametrize("heads,scheme", [((4, 4), "kv_group"), ((6, 3), "kv_group"), ((6, 3), "query_slot")])
def test_flap_prunes_to_target_and_reloads(heads, scheme, calib, tmp_path):
    model = tiny_model(*heads, layers=3)
    cap = captured(model, calib, tmp_path)
    dense = count_block_params(model)
    report = prune_model(model, cap, "flap", 0.3, scheme, batch_size=4)
    assert report.dense_block_params == dense
    assert report.pruned_block_params == count_block_params(model) < dense
    # achieved within one attention unit of the target (units are coarse on a tiny model)
    assert abs(report.achieved_sparsity - 0.3) < 0.12
    # the granularity the prune stage warns against, from the plan's units; not a key of the written report
    units = AttentionUnits(scheme if heads == (6, 3) else "kv_group", heads[0], heads[1], 48 // heads[0], 48)
    assert report.unit_fraction == units.unit_fraction(dense) > 0
    assert "unit_fraction" not in report.as_dict()
    for layer, spec in zip(model.model.layers, report.layers):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.shape[0] == spec["heads"] * 8 if heads == (6, 3) else spec["heads"] * 12
        assert mlp.down_proj.weight.shape[1] == spec["ffn"] == mlp.up_proj.weight.shape[0]
        assert mlp.down_proj.bias is not None and attn.o_proj.bias is not None
        if scheme == "query_slot":
            assert attn.k_proj.weight.shape[0] == 3 * 8  # every KV head kept
    assert_reloads_identically(model, calib, tmp_path)


def test_zero_sparsity_changes_nothing(calib, tmp_path):
    model = tiny_model(6, 3)
    cap = captured(model, calib, tmp_path)
    before = model(calib).logits.detach()
    report = prune_model(model, cap, "flap", 0.0)
    assert report.achieved_sparsity == 0.0 and torch.equal(model(calib).logits.detach(), before)


def test_flap_compensation_beats_plain_removal(calib, tmp_path):
    """Bias compensation should bring the pruned model's outputs closer to the dense ones."""
    dense = tiny_model(4, 4, layers=3)
    ref = dense(calib).logits.detach()
    errs = {}
    for comp in (True, False):
        model = tiny_model(4, 4, layers=3)
        cap = captured(model, calib, tmp_path / str(comp))
        prune_model(model, cap, "flap", 0.3)
        if not comp:
            for layer in model.model.layers:
                layer.self_attn.o_proj.bias.data.zero_()
                layer.mlp.down_proj.bias.data.zero_()
        errs[comp] = (model(calib).logits.detach() - ref).pow(2).mean().item()
    assert errs[True] < errs[False]


def test_unknown_method(calib, tmp_path):
    model = tiny_model(4, 4)
    with pytest.raises(FangError, match="unknown prune.method"):
        prune_model(model, captured(model, calib, tmp_path), "nope", 0.3)


# ---------------------------------------------------------------------------------------------- other methods

BASELINES = ("wanda_sp", "magnitude", "obc", "obc_iter")


def test_wanda_sp_and_magnitude_metrics_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 8, generator=g)
    x = torch.randn(30, 8, generator=g) + 1.0
    stats = InputStats()
    stats.add_batch(x[:13])
    stats.add_batch(x[13:])
    expected = torch.tensor(
        [sum(abs(float(w[i, j])) for i in range(5)) * float(x[:, j].double().norm()) for j in range(8)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(wanda_sp_metric(w, stats.sum_sq), expected)
    torch.testing.assert_close(
        magnitude_metric(w), torch.tensor([float(w[:, j].double().norm()) for j in range(8)], dtype=torch.float64)
    )


def test_channel_pruner_scores_heads_by_mean_of_their_columns():
    """Heads (and GQA units) are ranked by the mean channel metric over their o_proj columns, like FLAP."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 12, generator=g)
    x = torch.randn(40, 12, generator=g) * torch.linspace(0.1, 3.0, 12)
    units = torch.arange(12).reshape(4, 3)
    for make, metric in (
        (wanda_sp_pruner, lambda st: wanda_sp_metric(w, st.sum_sq)),
        (magnitude_pruner, lambda st: magnitude_metric(w)),
    ):
        pruner = make(12, "layer")
        pruner.add_batch(x)
        stats = InputStats()
        stats.add_batch(x)
        head = metric(stats).reshape(4, 3).mean(1)
        sel = pruner.select(w, 2, units)
        assert sel.keep.tolist() == sorted(torch.argsort(head, descending=True)[:2].tolist())
        assert sel.bias is None and sel.weight is None  # no compensation for these baselines


def test_unit_columns_layout():
    kv = AttentionUnits("kv_group", n_heads=6, n_kv=3, head_dim=2, hidden=12)
    assert kv.unit_heads().tolist() == [[0, 1], [2, 3], [4, 5]]
    assert kv.unit_columns()[1].tolist() == [4, 5, 6, 7]
    slot = AttentionUnits("query_slot", n_heads=6, n_kv=3, head_dim=2, hidden=12)
    assert slot.unit_heads().tolist() == [[0, 2, 4], [1, 3, 5]]
    assert slot.unit_columns()[1].tolist() == [2, 3, 6, 7, 10, 11]
    # the metric pooling agrees with units.group_scores / slot_scores
    heads = torch.rand(6, dtype=torch.float64)
    chan = heads.repeat_interleave(2)
    torch.testing.assert_close(chan[kv.unit_columns()].mean(1), kv.scores(heads))
    torch.testing.assert_close(chan[slot.unit_columns()].mean(1), slot.scores(heads))


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("heads,scheme", [((4, 4), "kv_group"), ((6, 3), "kv_group"), ((6, 3), "query_slot")])
def test_baselines_prune_to_target_and_reload(method, heads, scheme, calib, tmp_path):
    model = tiny_model(*heads, layers=2)
    cap = captured(model, calib, tmp_path)
    dense = count_block_params(model)
    report = prune_model(model, cap, method, 0.3, scheme, batch_size=4)
    assert report.pruned_block_params == count_block_params(model) < dense
    # heads are rounded to 30% and the FFN absorbs the rounding: each block within half a neuron of 30%
    neuron = 3 * model.config.hidden_size
    assert abs(report.achieved_sparsity - 0.3) <= 0.5 * neuron * len(report.layers) / dense
    n_units = 4 if heads == (4, 4) else (3 if scheme == "kv_group" else 2)
    for layer, spec in zip(model.model.layers, report.layers):
        attn, mlp = layer.self_attn, layer.mlp
        assert spec["ffn"] == mlp.down_proj.weight.shape[1]
        removed = dense // len(report.layers) - sum(p.numel() for p in layer.parameters())
        assert abs(removed - 0.3 * dense / len(report.layers)) <= neuron / 2
        kept_units = spec["kv_heads"] if scheme == "kv_group" else spec["heads"] // 3
        assert kept_units == max(1, int(n_units * 0.7 + 0.5))
        # baselines other than FLAP add no compensation bias
        assert mlp.down_proj.bias is None and attn.o_proj.bias is None
    assert_reloads_identically(model, calib, tmp_path)


def test_magnitude_needs_no_calibration_pass(calib, tmp_path):
    model = tiny_model(4, 4)
    w = [layer.mlp.down_proj.weight.detach().clone() for layer in model.model.layers]
    report = prune_model(model, captured(model, calib, tmp_path), "magnitude", 0.25)
    for wd, layer, spec in zip(w, model.model.layers, report.layers):
        keep = torch.sort(torch.argsort(wd.norm(dim=0), descending=True)[: spec["ffn"]]).values
        assert torch.equal(layer.mlp.down_proj.weight, wd[:, keep])


def test_obc_compensation_beats_plain_removal(calib, tmp_path):
    """OBC's compensated block-0 output is closer to the dense one than the same removal without it."""
    dense = tiny_model(4, 4, layers=1)
    cap = captured(dense, calib, tmp_path)
    ref = dense(calib).logits.detach()
    model = tiny_model(4, 4, layers=1)
    w_o = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    w_d = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    prune_model(model, cap, "obc", 0.3)
    err_obc = (model(calib).logits.detach() - ref).pow(2).mean().item()
    # the same kept units, original weights: plain removal
    layer = model.model.layers[0]
    # down/o columns were rewritten by the compensation: find the kept neurons / heads via the untouched up/q rows
    up_dense = dense.model.layers[0].mlp.up_proj.weight.detach()
    kept_n = [int(torch.nonzero((up_dense == row).all(1))[0]) for row in layer.mlp.up_proj.weight.detach()]
    q_dense = dense.model.layers[0].self_attn.q_proj.weight.detach()
    kept_rows = [int(torch.nonzero((q_dense == row).all(1))[0]) for row in layer.self_attn.q_proj.weight.detach()]
    with torch.no_grad():
        layer.mlp.down_proj.weight.copy_(w_d[:, kept_n])
        layer.self_attn.o_proj.weight.copy_(w_o[:, kept_rows])
    err_plain = (model(calib).logits.detach() - ref).pow(2).mean().item()
    assert err_obc < err_plain


def test_block_sparsity_option_sets_per_layer_counts(calib, tmp_path):
    model = tiny_model(4, 4, layers=2)
    cap = captured(model, calib, tmp_path)
    with pytest.raises(FangError, match="block_sparsity has 1 entries"):
        prune_model(model, cap, "obc", 0.3, options=PruneOptions(block_sparsity=[0.2]))
    opts = PruneOptions(block_sparsity=[0.1, 0.5])
    report = prune_model(model, cap, "obc", 0.3, options=opts)
    assert [s["heads"] for s in report.layers] == [4, 2]
    # block 0: no head removed (4 * 0.9 rounds to 4), so the FFN alone removes 10% of the block;
    # block 1: 2 heads are exactly half the attention, so the FFN also loses half of its neurons
    layer_params = count_block_params(tiny_model(4, 4, layers=1))
    neuron = 3 * model.config.hidden_size
    assert report.layers[0]["ffn"] == 64 - round(0.1 * layer_params / neuron)
    assert report.layers[1]["ffn"] == 32
    assert report.as_dict()["options"]["block_sparsity"] == [0.1, 0.5]


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_nonpositive_tau_is_rejected(tau, calib, tmp_path):
    model = tiny_model(4, 4)
    with pytest.raises(FangError, match="tau"):
        prune_model(model, captured(model, calib, tmp_path), "obc", 0.3, options=PruneOptions(tau=tau))


def test_nan_activations_give_a_clear_obc_error(calib, tmp_path):
    model = tiny_model(4, 4)
    cap = captured(model, calib, tmp_path)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(FangError, match="layer 1 o_proj.*NaN"):
        prune_model(model, cap, "obc", 0.3)


def test_fang_methods_need_their_inputs(calib, tmp_path):
    model = tiny_model(4, 4)
    cap = captured(model, calib, tmp_path)
    for method in ("f_fang", "o_fang"):
        with pytest.raises(FangError, match="fang_inputs.*|analysis artifacts"):
            prune_model(model, cap, method, 0.3)
