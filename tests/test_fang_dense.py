"""O-FANG with a dense-target refit (`prune.compensation: dense`, ours; fang/methods/dense_target.py): the FFN
neurons FANG chooses, refit with the plain layer Hessian to the dense model's down_proj output, and heads by
one-shot OBC on o_proj's dense-target weight. Against brute-force least squares on small layers, and end to
end on tiny random LLaMA models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import assert_reloads_identically, captured, tiny_model
from fang.analysis.cluster import relevance_weights
from fang.core.choices import parse_recipe, parse_variant
from fang.core.errors import FangError
from fang.methods import function_aware
from fang.methods.dense_target import CrossMoment, DenseTargetPruner
from fang.methods.driver import prune_model
from fang.methods.function_aware import FangLayerPruner, FunctionAware, plan_groups
from fang.methods.obc import ObcPruner, inverse_hessian, obc_prune
from fang.methods.units import PruneOptions, attention_units
from test_fang_prune import K, _data, make_fang_inputs


def _layer_data(seed=6, n=16, t=150):
    """Pruned-stream inputs x [t, n] with cluster labels, a down_proj weight w [5, n], and dense outputs y that
    are another map of x (the dense model's output is not the pruned layer's own)."""
    x, labels, w = _data(n=n, t=t, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    y = x @ w.T + 0.3 * x @ torch.randn(n, 5, generator=g, dtype=torch.float64)
    return x, labels, w, y


def _fang_layer(comp, x, labels, w, y=None, damp=0.0, n_remove=5):
    ids = torch.arange(x.shape[1]) % (K + 1)
    alpha = relevance_weights(torch.tensor([[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]]), tau=0.7)
    groups = plan_groups(ids, K, alpha, n_remove)
    pruner = FangLayerPruner("obc", groups, ids, K, damp=damp, compensation=comp,
                             targets=y if comp == "dense" else None)
    pruner.add_batch(x[:70], labels[:70])
    pruner.add_batch(x[70:], labels[70:])
    return pruner.select(w)


def _ridge(x, y, w, keep, damp):
    """Brute force: argmin_{W_K} ||Y - X_K W_K^T||^2 / T + lam ||W_K - W[:, K]||^2 (lam = damp * mean diag of
    H = X^T X / T, the dampening `inverse_hessian` adds) as one augmented least-squares problem."""
    t = x.shape[0]
    lam = damp * float((x.T @ x / t).diagonal().mean())
    xk = x[:, keep]
    a = torch.cat([xk, (lam * t) ** 0.5 * torch.eye(len(keep), dtype=x.dtype)])
    b = torch.cat([y, (lam * t) ** 0.5 * w[:, keep].T])
    return torch.linalg.lstsq(a, b).solution.T


# --------------------------------------------------------------------------------------- (c) the refit


@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_dense_refit_is_the_least_squares_fit_of_the_dense_output(damp):
    x, labels, w, y = _layer_data()
    sel = _fang_layer("dense", x, labels, w, y, damp)
    keep = sel.keep
    torch.testing.assert_close(sel.weight[:, keep], _ridge(x, y, w, keep, damp), rtol=1e-7, atol=1e-9)
    gone = torch.ones(x.shape[1], dtype=torch.bool)
    gone[keep] = False
    assert bool((sel.weight[:, gone] == 0).all())
    assert sel.info["compensation"] == "dense"
    # against the dense outputs it beats the layer refit, which fits the layer's own output instead
    layer = _fang_layer("layer", x, labels, w, damp=damp)
    err = {n: float((y - x @ s.weight.T).square().sum()) for n, s in (("dense", sel), ("layer", layer))}
    assert err["dense"] < err["layer"]


def test_dense_targets_equal_to_the_layers_own_output_give_the_layer_refit():
    x, labels, w, _ = _layer_data(seed=7)
    dense = _fang_layer("dense", x, labels, w, x @ w.T, damp=0.01)
    layer = _fang_layer("layer", x, labels, w, damp=0.01)
    torch.testing.assert_close(dense.weight, layer.weight, rtol=1e-9, atol=1e-11)


def test_a_block_that_loses_nothing_is_still_refit_to_the_dense_output():
    x, labels, w, y = _layer_data(seed=8)
    sel = _fang_layer("dense", x, labels, w, y, damp=0.0, n_remove=0)
    assert sel.keep.tolist() == list(range(x.shape[1]))
    torch.testing.assert_close(sel.weight, torch.linalg.lstsq(x, y).solution.T, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_heads_are_one_shot_obc_on_the_dense_target_weight(damp):
    """DenseTargetPruner(ObcPruner): heads (blocks of 2 columns) chosen by one-shot OBC on W*, and the kept
    columns are the (ridge) least-squares fit of the dense output; keeping all still returns W*."""
    x, _, w, y = _layer_data(seed=9, n=8)
    units = torch.arange(8).reshape(4, 2)

    def pruner():
        p = DenseTargetPruner(ObcPruner(8, damp, "test", "cpu"), y)
        for chunk in x.split(50):
            p.add_batch(chunk)
        return p

    sel = pruner().select(w, 2, units)
    cols = units[sel.keep].reshape(-1)
    torch.testing.assert_close(sel.weight[:, cols], _ridge(x, y, w, cols, damp), rtol=1e-7, atol=1e-9)
    w_star = _ridge(x, y, w, torch.arange(8), damp)
    hinv = inverse_hessian(x.T @ x / x.shape[0], damp)
    assert torch.equal(sel.keep, obc_prune(w_star, hinv, 2, units)[0])  # the heads one-shot OBC picks on W*
    all_kept = pruner().select(w, 4, units)
    assert all_kept.keep.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(all_kept.weight, w_star, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------------- (b) same neurons


@pytest.mark.parametrize("seed", [6, 11])
def test_dense_keeps_the_neurons_fangs_group_wise_choice_keeps(seed):
    x, labels, w, y = _layer_data(seed=seed)
    sel = {c: _fang_layer(c, x, labels, w, y, damp=0.01) for c in ("group", "layer", "dense")}
    assert torch.equal(sel["dense"].keep, sel["layer"].keep) and torch.equal(sel["dense"].keep, sel["group"].keep)
    assert sel["dense"].info["groups_removed"] == sel["layer"].info["groups_removed"]


# ------------------------------------------------------------------------------------------ end to end


def _dense_inputs(cap, calib, sparsity):
    return dataclasses.replace(make_fang_inputs(cap, [sparsity] * 3), token_ids=calib, batch_size=4)


def _final_hidden(model, ids):
    with torch.no_grad():
        return model.model(ids).last_hidden_state.double()


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_dense_refit_tracks_the_dense_model_better_and_hits_the_sparsity(calib, tmp_path, sparsity):
    """(a) On the calibration tokens the final hidden states of o_fang+dense are closer to the dense model's than
    o_fang's and o_fang+layer's; (b) the achieved sparsity is within one pruning unit of the target, and every
    block removes the neurons its plan asked."""
    dense = tiny_model(6, 3, layers=3)
    target = _final_hidden(dense, calib)
    cap = captured(dense, calib, tmp_path, batch_size=3)
    inputs = _dense_inputs(cap, calib, sparsity)
    errors, reports = {}, {}
    for comp in ("group", "layer", "dense"):
        m = tiny_model(6, 3, layers=3)
        reports[comp] = prune_model(m, cap, "o_fang", sparsity, batch_size=4,
                                    options=PruneOptions(tau=1.0, compensation=comp), inputs=inputs)
        errors[comp] = float((_final_hidden(m, calib) - target).square().sum() / target.square().sum())
    print(f"relative error of the final hidden states at {sparsity}: {errors}")
    assert errors["dense"] < errors["layer"] and errors["dense"] < errors["group"], errors
    r = reports["dense"]
    unit = attention_units(dense.config, "kv_group").unit_fraction(r.dense_block_params)
    assert abs(r.achieved_sparsity - sparsity) <= unit
    for e in r.as_dict()["layers"]:
        assert e["compensation"] == "dense"
        assert sum(e["groups_removed"]) == e["ffn_removed_target"] == 64 - e["ffn"]
        assert e["shared_removed"] == 0


def test_o_fang_dense_saves_and_reloads_identically(calib, input_ids, tmp_path):
    model = tiny_model(6, 3, layers=3)
    cap = captured(model, calib, tmp_path, batch_size=3)
    prune_model(model, cap, "o_fang", 0.4, "query_slot", batch_size=4,
                options=PruneOptions(tau=1.0, compensation="dense"), inputs=_dense_inputs(cap, calib, 0.4))
    assert_reloads_identically(model, input_ids, tmp_path)


# ------------------------------------------------------------------------------------------ (d) bad input


def _one_line(exc):
    assert "\n" not in str(exc.value), str(exc.value)


def test_dense_is_for_o_fang_only(calib, tmp_path):
    with pytest.raises(FangError, match="applies to o_fang only") as exc:
        parse_variant("f_fang+dense")
    _one_line(exc)
    assert parse_recipe("o_fang+dense").variant.compensation == "dense"
    assert parse_recipe("o_fang+flap_search+dense,tau=3").name == "o_fang+flap_search+dense,tau=3"
    model = tiny_model(6, 3, layers=3)
    cap = captured(model, calib, tmp_path, batch_size=3)
    with pytest.raises(FangError, match=r"f_fang\+dense: the dense-target refit is for O-FANG") as exc:
        prune_model(model, cap, "f_fang", 0.3, options=PruneOptions(tau=1.0, compensation="dense"),
                    inputs=_dense_inputs(cap, calib, 0.3))
    _one_line(exc)


def test_wrong_or_missing_token_streams_are_one_line_errors(calib, tmp_path):
    model = tiny_model(6, 3, layers=3)
    cap = captured(model, calib, tmp_path, batch_size=3)
    opts = PruneOptions(tau=1.0, compensation="dense")
    cases = [
        (dict(token_ids=None), "needs the calibration token ids"),
        (dict(token_ids=calib[:4]), "calibration token ids differ"),  # fewer sequences than the capture's
        (dict(token_ids=torch.cat([calib, calib[:1]])), "calibration token ids differ"),  # more
        (dict(token_ids=calib + 1000), "vocabulary"),
        (dict(token_ids=calib[0]), r"token_ids must be \[N, L\]"),
    ]
    for change, message in cases:
        inputs = dataclasses.replace(_dense_inputs(cap, calib, 0.3), **change)
        with pytest.raises(FangError, match=message) as exc:
            prune_model(tiny_model(6, 3, layers=3), cap, "o_fang", 0.3, batch_size=4, options=opts, inputs=inputs)
        _one_line(exc)


def test_cross_moment_checks_the_token_count():
    m = CrossMoment(torch.zeros(10, 3), "layer 2 down_proj")
    m.add_batch(torch.ones(2, 3, 4))
    with pytest.raises(FangError, match="streamed 6 tokens, the dense stream holds 10"):
        m.mean()
    with pytest.raises(FangError, match="more tokens than the dense stream holds"):
        m.add_batch(torch.ones(5, 4))


# ------------------------------------------------------------------------------------------ loading


def test_token_ids_are_loaded_only_for_the_dense_refit(calib, tmp_path, monkeypatch):
    """`FunctionAware.load_inputs` asks for the capture's token ids (and the prune batch size) only when the run's
    compensation is dense; `dense_target.capture_token_ids` reads them from the capture."""
    calls = []
    monkeypatch.setattr(function_aware, "load_fang_inputs", lambda art, **kw: calls.append(kw) or kw)
    params = tmp_path / "params.yaml"
    params.write_text("prune:\n  batch_size: 5\n")
    for comp in ("group", "layer", "dense"):
        FunctionAware.load_inputs(None, str(params), options=PruneOptions(compensation=comp))
    FunctionAware.load_inputs(None, str(params))
    assert calls == [{}, {}, {"token_ids": True, "batch_size": 5}, {}]

    model = tiny_model(6, 3, layers=3)
    cap_dir = tmp_path / "c"
    captured(model, calib, cap_dir)

    from fang.methods.dense_target import capture_token_ids

    assert torch.equal(capture_token_ids(cap_dir / "cap.zarr"), calib)


def test_the_prune_stage_runs_o_fang_dense_from_the_pipelines_artifacts(tmp_path, monkeypatch):
    """`fang prune --method o_fang+dense` (stages/prune.py) on the analysis the main pipeline's stages write: the
    stage passes the recipe's compensation to `load_inputs`, which reads the capture's token ids for it."""
    import json

    import yaml

    from helpers_tokenizer import tiny_tokenizer
    from stages import allocate, calibrate, capture, cluster, group, prune, taylor

    model = tiny_model(6, 3, layers=3)
    model.save_pretrained(tmp_path / "artifacts/model")
    tiny_tokenizer().save_pretrained(tmp_path / "artifacts/model")
    rows = [{"id": f"People {i}", "title": f"People {i}", "topic": "People",
             "text": f"The person number {i} is {'ab' * (i % 5)} and {i * 7}."} for i in range(30)]
    (tmp_path / "artifacts/data").mkdir(parents=True)
    (tmp_path / "artifacts/data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {"calibrate": {"n_samples": 6, "seq_len": 40}, "capture": {"batch_size": 4, "dtype": "float32"},
              "cluster": {"pca_dim": 8, "k": 3}, "taylor": {"batch_size": 3},
              "prune": {"method": "o_fang", "batch_size": 4, "tau": 1.0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    for stage in (calibrate, capture, cluster, taylor, group, allocate):
        stage.run("params.yaml")
    for spec in ("o_fang+layer", "o_fang+dense"):
        prune.run("params.yaml", method=spec, sparsity=0.3, out=f"artifacts/recipe/{spec}-0.3")
    report = json.loads((tmp_path / "artifacts/recipe/o_fang+dense-0.3.prune.json").read_text())
    assert report["options"]["compensation"] == "dense"
    assert {e["compensation"] for e in report["layers"]} == {"dense"}
    assert abs(report["achieved_sparsity"] - 0.3) < 0.05


def test_the_recipe_cells_manifest_records_the_dense_refit(tmp_path, monkeypatch):
    """A recipe cell of o_fang+dense reruns when its compensation or the batch size of its dense stream changes."""
    from fang.core.params import PruneParams
    from fang.core.paths import calibration_artifacts
    from fang.methods import inputs as mi

    monkeypatch.chdir(tmp_path)
    art = calibration_artifacts(None)
    for d in (art.cluster, art.taylor, art.groups):
        (d / "arr").mkdir(parents=True)
        (d / "arr" / "0").write_bytes(b"\x00")
    art.allocate.write_text('{"mode": "fc"}')
    dense = mi.method_inputs("o_fang+dense", PruneParams(), art)
    assert dense["params"]["compensation"] == "dense" and dense["params"]["prune.batch_size"] == 8
    assert dense != mi.method_inputs("o_fang+layer", PruneParams(), art)
    assert dense != mi.method_inputs("o_fang+dense", PruneParams(batch_size=4), art)
