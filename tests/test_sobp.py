"""SoBP (fang/methods/sobp.py): its three steps on small tensors against closed forms and brute force, and the
whole method on tiny random LLaMA models (sparsity, reload, reconstruction against magnitude)."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import assert_reloads_identically, captured, tiny_model
from fang.core.errors import FangError
from fang.methods.driver import PruneOptions, prune_model
from fang.methods.obc import inverse_hessian
from fang.core.choices import parse_variant
from fang.methods.plan import (
    first_order_plan, first_order_split_plan, global_top_k, param_matched_structure, pool_sparsity, structure_search,
)
from fang.methods.sobp import Sobp, SobpInputs, SobpPruner, first_order_scores, mask_gradient, module_target_weight
from fang.methods.units import attention_units
from fang.model.modeling import decoder_layers


def _token_ids(cap) -> torch.Tensor:
    return torch.from_numpy(cap["token_ids"][:].astype("int64"))


def _prune_sobp(model, cap, sparsity=0.3, scheme="kv_group", **opts):
    return prune_model(model, cap, "sobp", sparsity, scheme, batch_size=4, options=PruneOptions(**opts),
                       inputs=SobpInputs(_token_ids(cap), 4))


# ------------------------------------------------------------------------------------------ step 1


def test_first_order_scores_equal_the_mask_gradients_of_the_full_model(model, calib):
    """|dL/dm| from the block-by-block backward equals autograd of the mean loss through explicit masks."""
    units = attention_units(model.config, "kv_group")
    cols = units.unit_columns()
    layers = decoder_layers(model)
    masks_o = [torch.ones(units.count, requires_grad=True) for _ in layers]
    masks_d = [torch.ones(layer.mlp.down_proj.in_features, requires_grad=True) for layer in layers]

    def mask_o(m):
        def hook(_mod, args):
            col_mask = torch.ones(args[0].shape[-1])
            scale = col_mask.index_put((cols.reshape(-1),), m[:, None].expand_as(cols).reshape(-1))
            return (args[0] * scale,)
        return hook

    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(mask_o(m)) for layer, m in zip(layers, masks_o)]
    hooks += [layer.mlp.down_proj.register_forward_pre_hook(lambda _mod, a, m=m: (a[0] * m,))
              for layer, m in zip(layers, masks_d)]
    try:
        loss = model(calib, labels=calib).loss  # mean over the N * (L - 1) predicted tokens
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    attn, mlp = first_order_scores(model, calib, cols, batch_size=4, device="cpu")
    for li in range(len(layers)):
        torch.testing.assert_close(attn[li], masks_o[li].grad.double().abs(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(mlp[li], masks_d[li].grad.double().abs(), rtol=1e-4, atol=1e-7)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # no weight gradients; flags restored


def test_mask_gradient_sums_units_before_the_magnitude():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, -2.0, 0.0, 1.0]])
    g = torch.tensor([[1.0, 1.0, 1.0, -1.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(mask_gradient(x, g), torch.tensor([2.0, 0.0, 3.0, -3.0], dtype=torch.float64))
    torch.testing.assert_close(mask_gradient(x, g, torch.tensor([[0, 1], [2, 3]])),
                               torch.tensor([2.0, 0.0], dtype=torch.float64))


def test_first_order_plan_ranks_loss_change_per_parameter_globally():
    # block 1's neurons barely change the loss: the global cut takes them first, not an equal share per block
    attn = [torch.tensor([5.0, 6.0]), torch.tensor([5.0, 6.0])]
    mlp = [torch.full((10,), 1.0), torch.full((10,), 1e-3)]
    keep_attn, keep_mlp = first_order_plan(attn, mlp, 0.2, attn_unit_params=5, neuron_params=1)
    assert keep_attn == [2, 2] and keep_mlp == [10, 2]  # 8 of 40 cost units go, all from block 1's neurons
    # it is FLAP's structure search on scores per parameter, with the floors charged to the budget
    assert (keep_attn, keep_mlp) == structure_search([a / 5 for a in attn], list(mlp), 0.2, 5, 1,
                                                     floors_in_budget=True)
    # per parameter: a head whose removal changes the loss 6x more than a neuron's, at 10x the cost, goes first
    keep_attn, keep_mlp = first_order_plan([torch.tensor([3.0, 100.0])], [torch.full((10,), 0.5)], 1 / 3, 10, 1)
    assert keep_attn == [1] and keep_mlp == [10]  # 20 of 30 cost units kept, exactly the budget


@pytest.mark.parametrize("sparsity", [0.2, 0.3, 0.4])
def test_first_order_plan_hits_the_budget_when_the_floors_bind_in_most_blocks(sparsity):
    # the default model's shape: 30 blocks of 3 GQA units (294,912 parameters each) and 1,536 neurons (1,728
    # each); per parameter every unit's loss change is below every neuron's, as SoBP's scores are there, so
    # the cut alone would empty most blocks' attention and the floor of one unit per block binds
    g = torch.Generator().manual_seed(0)
    attn = [torch.rand(3, generator=g) * 1e-3 for _ in range(30)]
    mlp = [torch.rand(1536, generator=g) + 0.5 for _ in range(30)]
    unit, neuron = 294_912, 1_728
    total = 30 * (3 * unit + 1536 * neuron)
    keep_attn, keep_mlp = first_order_plan([a * unit for a in attn], [m * neuron for m in mlp], sparsity, unit, neuron)
    kept = sum(keep_attn) * unit + sum(keep_mlp) * neuron
    assert min(keep_attn) == 1 and min(keep_mlp) >= 1
    assert abs(kept - (1 - sparsity) * total) <= neuron / 2  # within half the smallest unit of the budget
    # without charging the floors, the same ranking keeps a unit more per emptied block: the bug this fixes
    old_attn, old_mlp = structure_search(attn, mlp, sparsity, unit, neuron)
    old_kept = sum(old_attn) * unit + sum(old_mlp) * neuron
    assert old_kept - (1 - sparsity) * total > 5 * unit


def test_floors_in_budget_keeps_the_default_units_when_no_floor_binds():
    g = torch.Generator().manual_seed(1)
    attn = [torch.rand(4, generator=g) + 1.0 for _ in range(5)]  # every layer keeps heads: no floor binds
    mlp = [torch.rand(50, generator=g) for _ in range(5)]
    for sparsity in (0.1, 0.25, 0.4):
        default = structure_search(attn, mlp, sparsity, 20, 1)
        charged = structure_search(attn, mlp, sparsity, 20, 1, floors_in_budget=True)
        # the same ranking: at most the threshold unit differs (FLAP's cut never keeps it; here it is kept
        # when that lands closer to the budget)
        extra = [c - d for kind in (0, 1) for c, d in zip(charged[kind], default[kind])]
        assert min(extra) >= 0 and sum(extra) <= 1


def test_pool_sparsity_removes_the_asked_share_of_block_parameters():
    # 100 block parameters of which 80 are prunable units: 30 of them must go for 30% of the blocks
    assert pool_sparsity(0.3, 100, 80) == pytest.approx(0.375)
    assert pool_sparsity(0.3, 80, 80) == pytest.approx(0.3)
    with pytest.raises(FangError, match="no block could keep one"):
        pool_sparsity(0.9, 100, 80)


# --------------------------------------------------------------------------------------- steps 2, 3


def _layer(seed=0, out=5, c=6, t=200):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, c, generator=g, dtype=torch.float64) @ torch.randn(c, c, generator=g, dtype=torch.float64)
    w = torch.randn(out, c, generator=g, dtype=torch.float64)
    y = x @ torch.randn(c, out, generator=g, dtype=torch.float64) * 0.5 + x @ w.T  # dense outputs: a different map
    return w, x, y


def _pruner(x, y, damp, units_width=1):
    p = SobpPruner(x.shape[1], damp, "test", "cpu", targets=y.float() if y is not None else None)
    p.hessian.hessian = p.hessian.hessian.double()  # float64 throughout for the exact comparisons
    for chunk in x.split(64):
        p.add_batch(chunk)
    p.cross = None if y is None else y.T @ x  # the exact float64 cross moment (targets are kept in float32)
    return p


def test_module_target_weight_is_the_ridge_refit_towards_the_dense_weight():
    w, x, y = _layer()
    t, damp = x.shape[0], 0.05
    h, cross = x.T @ x / t, y.T @ x / t
    hinv = inverse_hessian(h, damp)
    lam = damp * float(h.diagonal().mean())
    # argmin_W ||Y - X W^T||^2 / T + lam ||W - W_dense||^2  <=>  W (H + lam I) = C + lam W_dense
    expected = torch.linalg.solve(h + lam * torch.eye(h.shape[0], dtype=h.dtype), (cross + lam * w).T).T
    torch.testing.assert_close(module_target_weight(w, h, cross, hinv), expected)
    # when the dense outputs are the layer's own outputs on these inputs nothing changes
    torch.testing.assert_close(module_target_weight(w, h, w @ h, hinv), w)


def test_greedy_obs_on_the_target_weight_is_the_module_wise_least_squares_refit():
    w, x, y = _layer(1)
    p = _pruner(x, y, damp=0.0)
    sel = p.select(w, n_keep=4)
    kept = sel.keep
    # the kept columns hold the least-squares fit of the dense outputs from the kept inputs
    lstsq = torch.linalg.lstsq(x[:, kept], y).solution.T
    torch.testing.assert_close(sel.weight[:, kept], lstsq, rtol=1e-6, atol=1e-8)
    gone = torch.ones(x.shape[1], dtype=torch.bool)
    gone[kept] = False
    assert bool((sel.weight[:, gone] == 0).all())
    # and the objective splits into the full refit's residual plus the OBS cost on W* (the docstring's claim)
    w_star = torch.linalg.lstsq(x, y).solution.T
    total = (y - x[:, kept] @ sel.weight[:, kept].T).square().sum()
    split = (y - x @ w_star.T).square().sum() + (x @ w_star.T - x[:, kept] @ sel.weight[:, kept].T).square().sum()
    torch.testing.assert_close(total, split)


@pytest.mark.parametrize("width", [1, 2])
def test_one_greedy_step_is_the_brute_force_best_removal(width):
    """Removing one unit (a column, or a block of 2 as a head), the choice is the best of all candidates for
    the module-wise objective; a second removal is the best given the first (greedy)."""
    w, x, y = _layer(2, c=6)
    units = torch.arange(6).reshape(-1, width)

    def error(kept_units):
        cols = units[list(kept_units)].reshape(-1)
        fit = torch.linalg.lstsq(x[:, cols], y).solution
        return float((y - x[:, cols] @ fit).square().sum())

    n = units.shape[0]
    sel = _pruner(x, y, 0.0).select(w, n - 1, None if width == 1 else units)
    best = min(itertools.combinations(range(n), n - 1), key=error)
    assert tuple(sel.keep.tolist()) == best
    sel2 = _pruner(x, y, 0.0).select(w, n - 2, None if width == 1 else units)
    assert set(sel2.keep.tolist()) < set(best)
    given_first = min((k for k in itertools.combinations(best, n - 2)), key=error)
    assert tuple(sel2.keep.tolist()) == given_first


def test_pruner_refuses_a_token_stream_that_does_not_match_its_targets():
    w, x, y = _layer(3)
    p = SobpPruner(x.shape[1], 0.01, "layer 0 down_proj", "cpu", targets=y[:100].float())
    p.add_batch(x[:100])
    with pytest.raises(FangError, match="calibration token ids differ"):
        p.add_batch(x[100:])
    short = SobpPruner(x.shape[1], 0.01, "layer 0 down_proj", "cpu", targets=y.float())
    short.add_batch(x[:100])
    with pytest.raises(FangError, match="streamed 100 tokens"):
        short.select(w.float(), 4)


def test_global_top_k_ranks_across_layers_with_a_floor_per_layer():
    scores = [torch.tensor([9.0, 8.0, 7.0]), torch.tensor([0.1, 0.2]), torch.tensor([6.0, 5.0, 0.3])]
    # floors: 9 (layer 0), 0.2 (layer 1), 6 (layer 2); then the best of the rest: 8, 7, 5
    assert global_top_k(scores, 6) == [3, 1, 2]
    assert global_top_k(scores, 3) == [1, 1, 1]  # only the floors
    assert global_top_k(scores, 8) == [3, 2, 3]  # everything
    with pytest.raises(FangError, match="keep 2 of 8"):
        global_top_k(scores, 2)  # below the floors: one line, not a silent over-keep


def test_first_order_split_plan_keeps_the_param_matched_totals_and_moves_units_by_score():
    attn = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0]), torch.tensor([0.5, 0.6, 0.7])]
    mlp = [torch.arange(8.0), torch.arange(8.0) + 100, torch.arange(8.0) + 50]
    unit, neuron, blocks = 40, 3, [3 * 40 + 8 * 3 + 4] * 3
    keep_attn, keep_mlp = first_order_split_plan(attn, mlp, 0.4, unit, neuron, blocks)
    ref_attn, ref_mlp = param_matched_structure([3] * 3, [8] * 3, 0.4, unit, neuron, blocks)
    assert sum(keep_attn) == sum(ref_attn) and sum(keep_mlp) == sum(ref_mlp)  # the same budget per kind
    assert keep_attn[1] == 3 and keep_attn[2] == 1  # the high-loss-change block keeps its units
    # 40% of a 148-parameter block is one unit (40) and 6 neurons (18): 6 neurons kept in all, one per block
    # (the floors), the other 3 where the scores are highest (block 1's)
    assert keep_mlp == [1, 4, 1]


def test_first_order_split_is_a_sobp_allocation_only():
    assert parse_variant("sobp+first_order_split+layer").allocation == "first_order_split"
    with pytest.raises(FangError, match="neither an allocation of obc"):
        parse_variant("obc+first_order_split")


# ------------------------------------------------------------------------------------------ method


@pytest.mark.parametrize("scheme", ["kv_group", "query_slot"])
def test_sobp_hits_the_sparsity_and_the_pruned_model_reloads(model, calib, input_ids, tmp_path, scheme):
    cap = captured(model, calib, tmp_path)
    report = _prune_sobp(model, cap, 0.3, scheme)
    d = report.as_dict()
    unit = attention_units(model.config, scheme).unit_fraction(report.dense_block_params)
    assert abs(report.achieved_sparsity - 0.3) <= unit
    assert d["options"]["allocation"] == "first_order"
    assert all("first_order_loss_change" in e for e in d["layers"])
    assert_reloads_identically(model, input_ids, tmp_path)


def test_sobp_takes_the_shared_allocations(calib, tmp_path):
    model = tiny_model(6, 3, layers=3)
    cap = captured(model, calib, tmp_path)
    report = _prune_sobp(model, cap, 0.3, allocation="uniform")
    assert report.options["allocation"] == "uniform"
    assert {e["ffn"] for e in report.layers} == {report.layers[0]["ffn"]}  # the same count in every block


def test_sobp_first_order_split_hits_the_sparsity_without_emptying_attention(calib, tmp_path):
    model = tiny_model(6, 3, layers=3)
    cap = captured(model, calib, tmp_path)
    report = _prune_sobp(model, cap, 0.4, allocation="first_order_split", compensation="layer")
    unit = attention_units(model.config, "kv_group").unit_fraction(report.dense_block_params)
    assert abs(report.achieved_sparsity - 0.4) <= unit
    assert report.options["allocation"] == "first_order_split"
    # the parameter-matched split removes round(40% of 3) = 1 of each block's 3 KV groups: 6 kept in all,
    # placed by the first-order ranking, every block keeping at least one
    kept = [e["kv_heads"] for e in report.layers]
    assert sum(kept) == 6 and min(kept) >= 1


def _final_hidden(model, ids):
    with torch.no_grad():
        return model.model(ids).last_hidden_state.double()


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_sobp_reconstructs_better_than_magnitude_on_the_calibration_data(calib, tmp_path, sparsity):
    dense = tiny_model(6, 3, layers=3)
    target = _final_hidden(dense, calib)
    errors = {}
    for name in ("sobp", "magnitude", "obc_iter"):
        m = tiny_model(6, 3, layers=3)
        cap = captured(m, calib, tmp_path / name)
        if name == "sobp":
            _prune_sobp(m, cap, sparsity)
        else:
            prune_model(m, cap, name, sparsity, "kv_group", batch_size=4)
        errors[name] = float((_final_hidden(m, calib) - target).square().sum() / target.square().sum())
    assert errors["sobp"] < errors["magnitude"], errors


def test_without_module_wise_targets_sobp_is_greedy_obc(calib, tmp_path, monkeypatch):
    """Step 3 switched off and the same allocation: the greedy OBS of step 2 is obc_iter's, weight for weight."""
    a, b = tiny_model(6, 3, layers=3), tiny_model(6, 3, layers=3)
    cap = captured(a, calib, tmp_path / "a")
    # sobp+layer: step 3 off through prune.compensation
    prune_model(a, cap, "sobp", 0.3, "kv_group", batch_size=4,
                options=PruneOptions(allocation="uniform", compensation="layer"),
                inputs=SobpInputs(_token_ids(cap), 4))
    prune_model(b, captured(b, calib, tmp_path / "b"), "obc_iter", 0.3, "kv_group", batch_size=4,
                options=PruneOptions(allocation="uniform"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def test_sobp_bad_inputs_are_one_line_errors(calib, tmp_path):
    model = tiny_model(6, 3, layers=3)
    cap = captured(model, calib, tmp_path)
    with pytest.raises(FangError, match="needs the calibration token ids"):
        prune_model(model, cap, "sobp", 0.3, "kv_group", batch_size=4)
    with pytest.raises(FangError, match="vocabulary"):
        prune_model(model, cap, "sobp", 0.3, "kv_group", batch_size=4,
                    inputs=SobpInputs(torch.full((2, 8), 500), 4))


@pytest.mark.parametrize("mode", ["host", "disk"])
def test_sobp_with_streamed_blocks_saves_the_same_checkpoint(calib, tmp_path, mode):
    """Step 1's backward and the dense stream both run each block inside its turn on the device (model.offload):
    the pruned checkpoint is the same files, byte for byte, as without streaming."""
    from fang.model.modeling import load_dense
    from fang.model.offload import gather_blocks, load_dense_offloaded
    from fang.model.shrink import save_pruned
    from helpers_tokenizer import tiny_tokenizer

    ckpt = tmp_path / "model"
    tiny_model(6, 3, layers=3).save_pretrained(ckpt)
    tiny_tokenizer().save_pretrained(ckpt)
    dense, _ = load_dense(ckpt)
    cap = captured(dense, calib, tmp_path)
    reports = {}
    for m in ("none", mode):
        model, tokenizer = load_dense_offloaded(ckpt, offload=m)
        reports[m] = _prune_sobp(model, cap, 0.3).as_dict()
        save_pruned(gather_blocks(model), tokenizer, tmp_path / m)
    assert reports[mode] == reports["none"]
    files = sorted(p.relative_to(tmp_path / "none") for p in (tmp_path / "none").rglob("*") if p.is_file())
    assert files
    assert files == sorted(p.relative_to(tmp_path / mode) for p in (tmp_path / mode).rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / mode / f).read_bytes() == (tmp_path / "none" / f).read_bytes(), f


# --------------------------------------------------------------- the shared home (fang/methods/dense_target.py)


class _PreRefactorPruner:
    """SobpPruner as it was before it moved onto `dense_target.DenseTargetPruner`, inline: the float32 mean
    Hessian, the float64 cross moment of the targets, W* and greedy OBS on it."""

    def __init__(self, n_channels, damp, where, device, targets=None):
        from fang.methods.obc import HessianAccumulator

        self.n, self.damp, self.where, self.targets = n_channels, damp, where, targets
        self.hessian = HessianAccumulator(n_channels, device)
        self.cross, self.cursor = None, 0

    def add_batch(self, x):
        if self.targets is not None:
            rows = x.detach().reshape(-1, self.n)
            y = self.targets[self.cursor:self.cursor + rows.shape[0]].double()
            part = y.T @ rows.double()
            self.cross = part if self.cross is None else self.cross + part
            self.cursor += rows.shape[0]
        self.hessian.add_batch(x)

    def select(self, weight, n_keep, units=None):
        from fang.methods.base import Selection, default_units
        from fang.methods.obc import obc_prune_iterative

        units = default_units(self.n, units)
        hinv = inverse_hessian(self.hessian.hessian, self.damp, self.where)
        w = weight.detach()
        if self.targets is not None:
            w = module_target_weight(w, self.hessian.hessian, self.cross / self.hessian.n_tokens, hinv)
        single = units.shape[1] == 1 and torch.equal(units[:, 0], torch.arange(self.n))
        keep, new_w = obc_prune_iterative(w, hinv, units.shape[0] - n_keep, None if single else units)
        return Selection(keep.cpu(), weight=new_w)


@pytest.mark.parametrize("width,n_keep", [(1, 4), (2, 2), (2, 3)])
def test_the_shared_pruner_is_the_pre_refactor_math_bit_for_bit(width, n_keep):
    w, x, y = _layer(4, c=6)
    units = None if width == 1 else torch.arange(6).reshape(-1, width)
    new = SobpPruner(6, 0.01, "test", "cpu", targets=y.float())
    old = _PreRefactorPruner(6, 0.01, "test", "cpu", targets=y.float())
    for chunk in x.float().split(64):
        new.add_batch(chunk)
        old.add_batch(chunk)
    a, b = new.select(w.float(), n_keep, units), old.select(w.float(), n_keep, units)
    assert torch.equal(a.keep, b.keep) and torch.equal(a.weight, b.weight)


def test_sobp_on_a_tiny_model_is_the_pre_refactor_method_bit_for_bit(calib, tmp_path, monkeypatch):
    """The whole method with its pruners replaced by the inline pre-refactor ones (the same dense stream feeds
    both): the pruned weights are equal, not close."""
    from fang.methods import driver

    class PreRefactor(Sobp):
        def attention(self, ctx):
            o_targets, self._mlp_targets = self._stream.targets(ctx)
            return _PreRefactorPruner(ctx.layer.self_attn.o_proj.in_features, self.options.damp, "o", ctx.device,
                                      o_targets)

        def ffn(self, ctx):
            targets, self._mlp_targets = self._mlp_targets, None
            return _PreRefactorPruner(ctx.n_ffn, self.options.damp, "d", ctx.device, targets)

    a, b = tiny_model(6, 3, layers=3), tiny_model(6, 3, layers=3)
    cap = captured(a, calib, tmp_path)
    _prune_sobp(a, cap, 0.4)
    original = driver.method_class
    monkeypatch.setattr(driver, "method_class", lambda name: PreRefactor if name == "sobp" else original(name))
    _prune_sobp(b, cap, 0.4)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_dense_stream_gives_the_dense_models_module_outputs(calib):
    """DenseStream's targets, block by block, are the o_proj / down_proj outputs of a full dense forward."""
    from fang.methods.base import LayerContext
    from fang.methods.dense_target import DenseStream

    model = tiny_model(6, 3, layers=3)
    layers = decoder_layers(model)
    caught = {}
    hooks = [m.register_forward_hook(lambda _m, _a, out, key=(li, name): caught.setdefault(key, []).append(out))
             for li, layer in enumerate(layers) for name, m in (("o", layer.self_attn.o_proj), ("d", layer.mlp.down_proj))]
    with torch.no_grad():
        for sl in (slice(0, 4), slice(4, 6)):
            model(calib[sl])
    for h in hooks:
        h.remove()
    stream = DenseStream(model, calib, 4, "test")
    units = attention_units(model.config, "kv_group")
    for li, layer in enumerate(layers):
        ctx = LayerContext(li, layer, units, PruneOptions(), torch.device("cpu"), units.count, 64, {})
        o, d = stream.targets(ctx)
        torch.testing.assert_close(o, torch.cat(caught[(li, "o")]).reshape(-1, 48), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d, torch.cat(caught[(li, "d")]).reshape(-1, 48), rtol=1e-5, atol=1e-5)
    assert stream._hidden is None  # released after the last block
    with pytest.raises(FangError, match="in order"):
        stream.targets(LayerContext(0, layers[0], units, PruneOptions(), torch.device("cpu"), 1, 1, {}))
