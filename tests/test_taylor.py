"""Taylor scores (Eq. 5) equal a direct autograd computation on a tiny model."""

import torch

from conftest import tiny_model
from fang.taylor import taylor_scores


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


def test_scores_do_not_depend_on_batch_size(input_ids):
    model = tiny_model(4, 4)
    clusters = torch.randint(0, 2, (2, input_ids.numel()), generator=torch.Generator().manual_seed(1))
    a = taylor_scores(model, input_ids, clusters, 2, batch_size=1)
    b = taylor_scores(model, input_ids, clusters, 2, batch_size=4)
    torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a["block_sensitivity"], b["block_sensitivity"], rtol=1e-4, atol=1e-7)
