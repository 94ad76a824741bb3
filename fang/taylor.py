"""Cluster-neuron Taylor scores (Eq. 5) and per-block output sensitivity, from one forward+backward pass.

S[l, k, j] = mean over the tokens i of cluster k of |h_ij * dL/dh_ij|, where h is the input of
down_proj in block l (the neuron activations) and L the summed next-token loss. Gradients are
consumed by tensor hooks as they appear during backward and reduced per cluster on the fly, so no
gradient is ever stored.
"""

from __future__ import annotations

import torch
from torch import nn

from .layerwise import batch_slices
from .modeling import decoder_layers
from .progress import progress


def scatter_cluster_sum(values: torch.Tensor, clusters: torch.Tensor, k: int) -> torch.Tensor:
    """Sum rows of values [T, n] into k buckets by cluster id [T] -> [k, n] (float64)."""
    out = torch.zeros(k, values.shape[-1], dtype=torch.float64, device=values.device)
    out.index_add_(0, clusters.to(values.device), values.double())
    return out


def taylor_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    token_clusters: torch.Tensor,
    k: int,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Per-layer cluster-neuron scores [n_layers, k, n_ffn] and block sensitivity [n_layers].

    token_clusters [n_layers, N * L] holds each calibration token's cluster id in each layer.
    Block sensitivity is the first-order loss change from removing a block's update,
    mean over tokens of |<x_out - x_in, dL/dx_out>|: the `taylor` sparsity-allocation mode.
    """
    device = torch.device(device)
    model.to(device).eval()
    layers = decoder_layers(model)
    n_layers, n_ffn = len(layers), model.config.intermediate_size
    n_seq, seq_len = input_ids.shape
    sums = torch.zeros(n_layers, k, n_ffn, dtype=torch.float64)
    sensitivity = torch.zeros(n_layers, dtype=torch.float64)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # only activation gradients are needed, not weight gradients

    state: dict = {}
    handles = []

    def make_embed_hook():
        # with frozen weights nothing would require grad: start the graph at the embeddings
        return lambda _m, _inp, out: out.requires_grad_(True)

    def down_hook(li: int):
        def hook(_m, args):
            h = args[0]
            if h.requires_grad:
                clusters, h_val = state["clusters"][li], h.detach()

                def on_grad(g: torch.Tensor) -> None:  # returning None leaves the gradient untouched
                    sums[li] += scatter_cluster_sum((h_val * g).abs().reshape(-1, n_ffn), clusters, k).cpu()

                h.register_hook(on_grad)
        return hook

    def block_hooks(li: int):
        def pre(_m, args, kwargs):
            state[("in", li)] = (args[0] if args else kwargs["hidden_states"]).detach()

        def post(_m, _args, _kwargs, out):
            x_out = out[0] if isinstance(out, tuple) else out
            if x_out.requires_grad:
                delta = x_out.detach() - state.pop(("in", li))

                def on_grad(g: torch.Tensor) -> None:
                    sensitivity[li] += (delta * g).sum(-1).abs().sum().double().cpu()

                x_out.register_hook(on_grad)
        return pre, post

    handles.append(model.get_input_embeddings().register_forward_hook(make_embed_hook()))
    for li, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook(li)))
        pre, post = block_hooks(li)
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))

    counts = torch.zeros(n_layers, k, dtype=torch.float64)
    clusters_all = token_clusters.view(n_layers, n_seq, seq_len).long()
    try:
        with progress() as bar:
            task = bar.add_task("taylor (fwd+bwd)", total=n_seq)
            for sl in batch_slices(n_seq, batch_size):
                ids = input_ids[sl].to(device)
                state["clusters"] = clusters_all[:, sl].reshape(n_layers, -1).to(device)
                for li in range(n_layers):
                    counts[li] += torch.bincount(state["clusters"][li].cpu(), minlength=k).double()
                logits = model(input_ids=ids, use_cache=False).logits
                # summed (not averaged) loss: each token's gradient is its own loss's, whatever the batch size
                loss = nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
                )
                loss.backward()
                bar.advance(task, sl.stop - sl.start)
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    scores = sums / counts.clamp_min(1.0).unsqueeze(-1)
    return {
        "scores": scores.float(),
        "token_counts": counts.long(),
        "block_sensitivity": (sensitivity / (n_seq * seq_len)).float(),
    }
