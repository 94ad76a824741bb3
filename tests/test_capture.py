"""Streaming capture: stored features equal the model's own activations."""

import numpy as np
import pytest
import torch

from fang.analysis.capture import capture_features, open_capture, to_store_rows
from fang.core.errors import FangError


def test_capture_matches_forward_pass(model, input_ids, tmp_path):
    info = capture_features(model, input_ids, tmp_path / "cap.zarr", batch_size=3, dtype="float32")
    store = open_capture(tmp_path / "cap.zarr")
    n_layers, T = model.config.num_hidden_layers, input_ids.numel()
    assert info["tokens"] == T and store["block_io"].shape == (n_layers + 1, T, 48)
    assert np.array_equal(store["token_ids"][:], input_ids.numpy())

    feats = {}
    hooks = []
    for li, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, li=li: feats.__setitem__(("ffn", li), a[0])))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, li=li: feats.__setitem__(("down", li), a[0])))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, li=li: feats.__setitem__(("o", li), a[0])))
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True)
    for h in hooks:
        h.remove()
    for li in range(n_layers):
        np.testing.assert_allclose(store["block_io"][li], out.hidden_states[li].reshape(T, -1).numpy(), atol=1e-5)
        np.testing.assert_allclose(store["ffn_in"][li], feats[("ffn", li)].reshape(T, -1).numpy(), atol=1e-5)
        down = feats[("down", li)].reshape(T, -1).double()
        np.testing.assert_allclose(store["down_in"][li], down.numpy(), atol=1e-5)
        np.testing.assert_allclose(store["down_in_mean"][li], down.mean(0).numpy(), atol=1e-6)
        np.testing.assert_allclose(store["down_in_var"][li], down.var(0, unbiased=False).numpy(), atol=1e-6)
        o = feats[("o", li)].reshape(T, -1).double()
        np.testing.assert_allclose(store["o_proj_in_var"][li], o.var(0, unbiased=False).numpy(), atol=1e-6)
    # the last block's output is the final residual stream, before the model's final norm
    last = model.model.norm(torch.from_numpy(store["block_io"][n_layers]).float())
    np.testing.assert_allclose(last.detach().numpy(), out.hidden_states[-1].reshape(T, -1).numpy(), atol=1e-4)


def test_capture_chunks_one_layer_per_chunk(model, input_ids, tmp_path):
    capture_features(model, input_ids, tmp_path / "cap.zarr", batch_size=2)
    store = open_capture(tmp_path / "cap.zarr")
    assert store["down_in"].chunks[0] == 1 and store["down_in"].dtype == np.float16


def test_interrupted_capture_leaves_nothing(model, input_ids, tmp_path, monkeypatch):
    import fang.analysis.capture as cap

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(cap, "input_hooks", boom)
    with pytest.raises(RuntimeError):
        capture_features(model, input_ids, tmp_path / "cap.zarr")
    assert list(tmp_path.iterdir()) == []


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(FangError, match="capture store not found"):
        open_capture(tmp_path / "nope.zarr")


def test_store_conversion_rounds_like_numpy():
    # ties, fp16 subnormals and underflow, overflow to inf, the largest fp16, signed zero, nan
    edge = [1 + 2**-11, 1 + 3 * 2**-11, 2**-24, 2**-25, 3 * 2**-26, 65504.0, 65520.0, 1e6, -0.0, float("nan")]
    noise = torch.randn(4094, generator=torch.Generator().manual_seed(0)) * 300
    x = torch.cat([torch.tensor(edge), noise]).reshape(-1, 12)
    got = to_store_rows(x, np.float16)
    assert got.dtype == np.float16 and got.shape == (342, 12)
    with np.errstate(over="ignore"):  # 65520 and 1e6 overflow to inf on purpose
        expected = x.numpy().astype(np.float16)
    assert np.array_equal(got.view(np.uint16), expected.view(np.uint16))
    same = to_store_rows(x, np.float32)
    assert np.array_equal(same, x.numpy(), equal_nan=True)
    same[0, 0] = 123.0  # a copy, never a view of the caller's tensor
    assert x[0, 0] != 123.0


def test_failed_background_write_fails_the_capture_and_leaves_nothing(model, input_ids, tmp_path, monkeypatch):
    import zarr

    real, calls = zarr.Array.__setitem__, []

    def flaky(self, key, value):
        calls.append(key)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", flaky)
    with pytest.raises(OSError, match="disk full"):
        capture_features(model, input_ids, tmp_path / "cap.zarr", batch_size=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moments_float32_batches_match_float64(dtype):
    """FLAP's per-channel moments: float32 per batch, merged in float64, agree with one float64 pass over all
    tokens, also for channels whose mean is far larger than their spread (where a one-pass E[x^2] - E[x]^2
    in float32 would lose every digit)."""
    from fang.analysis.capture import _Moments

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 50, 40, generator=g) * torch.linspace(0.01, 5, 40) + torch.linspace(-300, 300, 40)
               for _ in range(5)]
    batches[-1] = batches[-1][:1]  # a short last batch, as when batch_size does not divide the set
    batches = [b.to(dtype) for b in batches]
    m = _Moments(40, torch.device("cpu"))
    for b in batches:
        m.add(b)
    ref = torch.cat([b.reshape(-1, 40) for b in batches]).double()
    assert m.n == ref.shape[0]
    torch.testing.assert_close(m.mean, ref.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.variance, ref.var(0, unbiased=False), rtol=1e-5, atol=1e-9)


def test_moments_update_in_place_equals_the_plain_expression_bit_for_bit():
    """The in-place centring and squaring is the same float32 arithmetic as ((y - my) ** 2).sum(0)."""
    from fang.analysis.capture import _Moments

    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(2, 64, 40, generator=g) * 3 + 50 for _ in range(3)]
    m = _Moments(40, torch.device("cpu"))
    mean = torch.zeros(40, dtype=torch.float64)
    m2 = torch.zeros(40, dtype=torch.float64)
    n = 0
    for b in batches:
        x = b.reshape(-1, 40)
        shift = mean.float() if n else x[0]
        y = x - shift
        my = y.mean(0)
        m2b = ((y - my) ** 2).sum(0).double()
        delta = shift.double() + my.double() - mean
        total = n + x.shape[0]
        mean += delta * x.shape[0] / total
        m2 += m2b + delta**2 * n * x.shape[0] / total
        n = total
        before = b.clone()
        m.add(b)
        assert torch.equal(b, before)  # the block's activation is left as it was
    assert torch.equal(m.mean, mean) and torch.equal(m.m2, m2)


def test_a_residual_stream_that_does_not_fit_on_disk_is_refused_or_left_out(tmp_path, monkeypatch):
    """capture.residual: true refuses a stream the disk cannot hold, naming the size and the setting;
    auto leaves out one that is over RESIDUAL_AUTO_GIB or over half the free disk."""
    import shutil
    from collections import namedtuple

    import pytest

    from fang.analysis.capture import RESIDUAL_AUTO_GIB, keep_residual, residual_bytes
    from fang.core.errors import FangError

    default = residual_bytes(30, 64 * 512, 576)
    assert default == 31 * 64 * 512 * 576 * 4  # the default model and calibration: 2.2 GiB
    usage = namedtuple("usage", "total used free")
    free = {"bytes": 2**30}
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10 * 2**40, 0, free["bytes"]))
    with pytest.raises(FangError, match=r"residual stream .* needs about 2.1\d GiB of disk, but only 1.00 GiB is free .*capture.residual: false"):
        keep_residual(True, default, tmp_path / "not" / "yet")
    assert not keep_residual("auto", default, tmp_path)  # more than half the free disk
    assert not keep_residual(False, default, tmp_path)
    free["bytes"] = 2**40
    assert keep_residual(True, default, tmp_path) and keep_residual("auto", default, tmp_path)
    assert not keep_residual("auto", RESIDUAL_AUTO_GIB * 2**30 + 1, tmp_path)  # LLaMA-2-7B at 128 x 2048: 132 GiB
