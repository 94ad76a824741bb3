"""Taylor scores (Eq. 5) equal a direct autograd computation on a tiny model."""

import torch

from conftest import tiny_model
from fang.analysis.taylor import taylor_scores


def direct_scores(model, ids, clusters, k):
    """Keep every h and its gradient explicitly, then average |h * dL/dh| per cluster."""
    hs = {}

    def keep(li):
        def hook(_m, args):
            args[0].retain_grad()
            hs[li] = args[0]
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(keep(li)) for li, layer in enumerate(model.model.layers)]
    emb = model.get_input_embeddings()
    h0 = emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    for h in handles:
        h.remove()
    h0.remove()
    out = []
    for li in range(len(model.model.layers)):
        t = (hs[li] * hs[li].grad).abs().reshape(-1, hs[li].shape[-1])
        c = clusters[li]
        out.append(torch.stack([t[c == j].mean(0) if (c == j).any() else torch.zeros(t.shape[1]) for j in range(k)]))
    return torch.stack(out)


def test_taylor_scores_match_direct_autograd(input_ids):
    model = tiny_model(6, 3)
    k = 3
    g = torch.Generator().manual_seed(0)
    clusters = torch.randint(0, k, (2, input_ids.numel()), generator=g)
    res = taylor_scores(model, input_ids, clusters, k, batch_size=3)  # 2 batches of 3 + 1 sequences
    for p in model.parameters():
        p.requires_grad_(False)
    expected = direct_scores(model, input_ids, clusters, k)
    assert res["scores"].shape == (2, k, 64)
    torch.testing.assert_close(res["scores"], expected.float(), rtol=1e-4, atol=1e-6)
    assert torch.equal(res["token_counts"][0], torch.bincount(clusters[0], minlength=k))
    assert (res["block_sensitivity"] > 0).all()
    # weights are left as they were: trainable again, no gradients kept
    assert all(p.grad is None for p in model.parameters())


def test_loss_over_the_vocabulary_in_chunks_gives_the_same_scores(input_ids, monkeypatch):
    import fang.analysis.taylor as taylor

    model = tiny_model(4, 4)
    clusters = torch.randint(0, 2, (2, input_ids.numel()), generator=torch.Generator().manual_seed(4))
    whole = taylor_scores(model, input_ids, clusters, 2, batch_size=4)
    monkeypatch.setattr(taylor, "LOGIT_BUDGET", 7 * 128)  # 7 tokens' logits at a time: uneven chunks
    chunked = taylor_scores(model, input_ids, clusters, 2, batch_size=4)
    for name in ("scores", "block_sensitivity", "down_centers"):
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-5, atol=1e-7)


def test_scores_do_not_depend_on_batch_size(input_ids):
    model = tiny_model(4, 4)
    clusters = torch.randint(0, 2, (2, input_ids.numel()), generator=torch.Generator().manual_seed(1))
    a = taylor_scores(model, input_ids, clusters, 2, batch_size=1)
    b = taylor_scores(model, input_ids, clusters, 2, batch_size=4)
    torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a["block_sensitivity"], b["block_sensitivity"], rtol=1e-4, atol=1e-7)


def test_sensitivity_and_down_centers_match_direct_computation(input_ids):
    model = tiny_model(4, 4, layers=3)
    k = 3
    clusters = torch.randint(0, k, (3, input_ids.numel()), generator=torch.Generator().manual_seed(2))
    res = taylor_scores(model, input_ids, clusters, k, batch_size=3)
    for p in model.parameters():
        p.requires_grad_(False)
    ins, outs, hs = {}, {}, {}
    handles = []
    for li, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, kw, li=li: ins.__setitem__(li, kw.get("hidden_states", a[0] if a else None)), with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, o, li=li: outs.__setitem__(li, (o[0] if isinstance(o, tuple) else o))))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, li=li: hs.__setitem__(li, a[0].detach())))
        # keep dL/dx_out of every block
    emb = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    logits = model(input_ids=input_ids).logits
    for li in outs:
        outs[li].retain_grad()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), input_ids[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    for h in handles + [emb]:
        h.remove()
    for li in range(3):
        delta = (outs[li] - ins[li]).detach()
        expected = (delta * outs[li].grad).sum(-1).abs().mean()
        torch.testing.assert_close(res["block_sensitivity"][li], expected.float(), rtol=1e-4, atol=1e-6)
        h = hs[li].reshape(-1, 64)
        centers = torch.stack([h[clusters[li] == j].mean(0) for j in range(k)])
        torch.testing.assert_close(res["down_centers"][li], centers, rtol=1e-5, atol=1e-6)


class SavedBytes:
    """Peak bytes of activations autograd keeps for backward (parameters excluded), via saved-tensor hooks."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live: dict[int, list[int]] = {}
        self.now = self.peak = 0

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.params:
            return t
        entry = self.live.setdefault(ptr, [0, t.untyped_storage().nbytes()])
        if entry[0] == 0:
            self.now += entry[1]
            self.peak = max(self.peak, self.now)
        entry[0] += 1
        return _Held(t, self, ptr)

    def unpack(self, held):
        return held.t if isinstance(held, _Held) else held

    def release(self, ptr):
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.live[ptr]


class _Held:
    def __init__(self, t, meter, ptr):
        self.t, self.meter, self.ptr = t, meter, ptr

    def __del__(self):
        self.meter.release(self.ptr)


def _peak_saved(layers, fn):
    model = tiny_model(4, 4, layers=layers)
    meter = SavedBytes(model)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        fn(model)
    return meter.peak


def test_kept_activations_do_not_grow_with_depth():
    ids = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(3))

    def full_backprop(model):  # what plain autograd over the whole model keeps
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        logits = model(input_ids=ids).logits
        emb.remove()
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1), reduction="sum").backward()

    def taylor(model):
        n = len(model.model.layers)
        taylor_scores(model, ids, torch.zeros(n, ids.numel(), dtype=torch.long), 2, batch_size=8)

    full = {n: _peak_saved(n, full_backprop) for n in (2, 8)}
    ours = {n: _peak_saved(n, taylor) for n in (2, 8)}
    assert full[8] > 2.5 * full[2]  # the meter sees activations pile up with depth
    assert ours[8] <= 1.05 * ours[2], ours  # one block at a time
    assert ours[8] < full[8] / 3


def test_blocks_that_keep_their_graph_give_the_recomputed_scores(input_ids):
    """graph_blocks trades memory for the recompute; the gradients are the same ones."""
    k = 3
    clusters = torch.randint(0, k, (4, input_ids.numel()), generator=torch.Generator().manual_seed(1))
    base = taylor_scores(tiny_model(6, 3, layers=4), input_ids, clusters, k, batch_size=3)
    for graph_blocks in (1, 4, 9):  # some blocks, all of them, more than there are
        res = taylor_scores(tiny_model(6, 3, layers=4), input_ids, clusters, k, batch_size=3, graph_blocks=graph_blocks)
        for name in base:
            torch.testing.assert_close(res[name], base[name], rtol=1e-5, atol=1e-7, msg=f"{name}, graph_blocks={graph_blocks}")


def test_kept_graphs_cost_a_fixed_number_of_blocks():
    ids = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(3))

    def taylor(graph_blocks):
        def run(model):
            n = len(model.model.layers)
            taylor_scores(model, ids, torch.zeros(n, ids.numel(), dtype=torch.long), 2, batch_size=8,
                          graph_blocks=graph_blocks)
        return run

    recompute = _peak_saved(8, taylor(0))
    two = {n: _peak_saved(n, taylor(2)) for n in (4, 8)}
    assert two[8] <= 1.05 * two[4], two  # two blocks' graphs, whatever the depth
    assert two[8] > 1.5 * recompute  # and they are kept: more than the one block of the recompute


def test_negative_graph_blocks_is_an_error(input_ids):
    import pytest

    from fang.core.errors import FangError

    with pytest.raises(FangError, match="graph_blocks"):
        taylor_scores(tiny_model(6, 3), input_ids, torch.zeros(2, input_ids.numel(), dtype=torch.long), 2, graph_blocks=-1)


def _store_with_residual(model, ids, path, batch_size=2):
    from fang.analysis.capture import capture_features, open_capture

    capture_features(model, ids, path, batch_size=batch_size, keep=(), residual=True)
    return open_capture(path)


def test_capture_residual_is_the_stream_the_blocks_make(input_ids, tmp_path):
    """residual[l] is block l's input and residual[n] the last block's output, in float32."""
    model = tiny_model(6, 3, layers=3)
    cap = _store_with_residual(model, input_ids, tmp_path / "cap.zarr")
    with torch.no_grad():
        states = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    res = cap["residual"]
    assert res.dtype == "float32" and res.shape == (4, input_ids.numel(), model.config.hidden_size)
    for li in range(3):  # hidden_states[l] is block l's input (the last one is after the final norm)
        torch.testing.assert_close(torch.from_numpy(res[li]), states[li].reshape(-1, 48), rtol=1e-5, atol=1e-6)


def test_taylor_from_the_residual_stream_gives_the_recomputed_scores(input_ids, tmp_path):
    """Reading block inputs from capture skips the first forward; scores, sensitivity, centres are unchanged."""
    from fang.analysis.capture import capture_residual

    k = 3
    clusters = torch.randint(0, k, (4, input_ids.numel()), generator=torch.Generator().manual_seed(1))
    model = tiny_model(6, 3, layers=4)
    cap = _store_with_residual(model, input_ids, tmp_path / "cap.zarr", batch_size=3)
    residual = capture_residual(cap, input_ids, "float32")
    assert residual is not None
    base = taylor_scores(model, input_ids, clusters, k, batch_size=2)
    res = taylor_scores(model, input_ids, clusters, k, batch_size=2, residual=residual, graph_blocks=2)
    for name in base:
        torch.testing.assert_close(res[name], base[name], rtol=1e-5, atol=1e-7, msg=name)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.testing.assert_close(res["scores"], direct_scores(model, input_ids, clusters, k).float(), rtol=1e-4, atol=1e-6)


def test_a_residual_stream_from_other_tokens_or_dtype_is_not_used(input_ids, tmp_path):
    import pytest

    from fang.analysis.capture import capture_residual
    from fang.core.errors import FangError

    model = tiny_model(6, 3)
    cap = _store_with_residual(model, input_ids, tmp_path / "cap.zarr")
    assert capture_residual(cap, input_ids, "bfloat16") is None  # made in float32: taylor recomputes
    with pytest.raises(FangError, match="other calibration tokens"):
        capture_residual(cap, (input_ids + 1) % 128, "float32")
    with pytest.raises(FangError, match="residual stream has shape"):
        taylor_scores(model, input_ids[:2], torch.zeros(2, input_ids[:2].numel(), dtype=torch.long), 2,
                      residual=cap["residual"])


def test_a_capture_without_residual_leaves_taylor_to_recompute(input_ids, tmp_path):
    from fang.analysis.capture import capture_features, capture_residual, open_capture

    capture_features(tiny_model(6, 3), input_ids, tmp_path / "cap.zarr", batch_size=2, keep=())
    assert capture_residual(open_capture(tmp_path / "cap.zarr"), input_ids, "float32") is None
