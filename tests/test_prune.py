"""The sequential FLAP driver on tiny models: real shrinking, target sparsity, reload, GQA schemes."""

import pytest
import torch

from conftest import tiny_model
from fang.capture import capture_features, open_capture
from fang.errors import FangError
from fang.modeling import count_block_params
from fang.prune import prune_model
from fang.shrink import load_pruned, save_pruned
from helpers_tokenizer import tiny_tokenizer


@pytest.fixture
def calib():
    return torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(5))


def captured(model, calib, tmp_path):
    capture_features(model, calib, tmp_path / "cap.zarr", batch_size=4, dtype="float32")
    return open_capture(tmp_path / "cap.zarr")


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
    for layer, spec in zip(model.model.layers, report.layers):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.shape[0] == spec["heads"] * 8 if heads == (6, 3) else spec["heads"] * 12
        assert mlp.down_proj.weight.shape[1] == spec["ffn"] == mlp.up_proj.weight.shape[0]
        assert mlp.down_proj.bias is not None and attn.o_proj.bias is not None
        if scheme == "query_slot":
            assert attn.k_proj.weight.shape[0] == 3 * 8  # every KV head kept
    with torch.no_grad():
        logits = model(calib).logits
    assert torch.isfinite(logits).all()
    save_pruned(model, tiny_tokenizer(), tmp_path / "pruned")
    reloaded, _ = load_pruned(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(reloaded(calib).logits, logits)


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
