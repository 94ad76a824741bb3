"""float32 Hessians (SparseGPT-style running mean) against the float64 reference: same units kept."""

import pytest
import torch

from conftest import captured, tiny_model
from fang.core.errors import FangError
from fang.methods import obc
from fang.methods.driver import PruneOptions, prune_model
from test_fang_prune import make_fang_inputs


def _kept_rows(dense: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Rows of a dense weight that survive in the pruned one (q_proj / up_proj rows are copied untouched)."""
    return [int(torch.nonzero((dense == row).all(1))[0]) for row in pruned]


def _prune(method, dtype, calib, tmp_path, monkeypatch):
    monkeypatch.setattr(obc, "HESSIAN_DTYPE", dtype)
    model = tiny_model(6, 3, layers=3)
    dense = tiny_model(6, 3, layers=3)
    cap = captured(model, calib, tmp_path, batch_size=3)
    kw = {}
    if method == "o_fang":
        kw["inputs"] = make_fang_inputs(cap, [0.2, 0.3, 0.4])
    prune_model(model, cap, method, 0.3, batch_size=4, options=PruneOptions(tau=1.0), **kw)
    kept = []
    for ld, lp in zip(dense.model.layers, model.model.layers):
        kept.append(
            (
                _kept_rows(ld.self_attn.q_proj.weight.detach(), lp.self_attn.q_proj.weight.detach()),
                _kept_rows(ld.mlp.up_proj.weight.detach(), lp.mlp.up_proj.weight.detach()),
            )
        )
    with torch.no_grad():
        logits = model(calib).logits
    return kept, logits, [lp.mlp.down_proj.weight.detach().clone() for lp in model.model.layers]


@pytest.mark.parametrize("method", ["obc", "obc_iter", "o_fang"])
def test_float32_and_float64_hessians_keep_the_same_units(method, calib, tmp_path, monkeypatch):
    kept64, logits64, w64 = _prune(method, torch.float64, calib, tmp_path / "64", monkeypatch)
    kept32, logits32, w32 = _prune(method, torch.float32, calib, tmp_path / "32", monkeypatch)
    assert kept32 == kept64
    assert any(len(ffn) < 64 for _, ffn in kept64)  # something was really pruned
    # compensated weights and the model's outputs agree to float32 round-off of a well-damped solve
    for a, b in zip(w32, w64):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert (logits32 - logits64).abs().max() <= 1e-3 * logits64.abs().max()


def test_accumulator_is_a_float32_running_mean_of_float32_activations():
    g = torch.Generator().manual_seed(2)
    # activations with an outlier channel 1000x the others, as in LLMs
    x = torch.randn(50, 40, 6, generator=g) * torch.tensor([1.0, 1.0, 1000.0, 1.0, 1.0, 1.0])
    acc = obc.HessianAccumulator(6)
    for batch in x:
        acc.add_batch(batch)
    ref = torch.einsum("btc,btd->cd", x.double(), x.double()) / 2000
    assert acc.hessian.dtype == torch.float32 and acc.weight_sum == 2000
    torch.testing.assert_close(acc.hessian.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_float32_singular_hessian_names_the_layer():
    x = torch.randn(100, 5, generator=torch.Generator().manual_seed(0))
    x[:, 3] = 0.0
    acc = obc.HessianAccumulator(5)
    acc.add_batch(x)
    with pytest.raises(FangError, match="layer 4 down_proj.*not positive definite.*float32"):
        obc.inverse_hessian(acc.hessian, damp=0.0, where="layer 4 down_proj")
    hinv = obc.inverse_hessian(acc.hessian, damp=0.01)
    assert hinv.dtype == torch.float32 and torch.isfinite(hinv).all()
