"""Cluster-neuron Taylor scores (Eq. 5) and per-block output sensitivity, from one forward+backward pass.

S[l, k, j] = mean over the tokens i of cluster k of |h_ij * dL/dh_ij|, where h is the input of
down_proj in block l (the neuron activations) and L the summed next-token loss.

Memory is bounded by one block, not the model's depth. Plain autograd over the whole model keeps
every block's intermediate activations until backward reaches it (attention projections, the
three FFN products, norms: ~6d + 5 n_ffn floats per token and block, 6 GiB for 30 blocks of the
135M default at 4 x 512 tokens) plus logits over the whole vocabulary for the whole batch, with
their softmax and gradient. Here the backward runs block by block instead:

1. a no-grad forward keeps only each block's input (d floats per token and block, on the host);
2. the final norm, LM head and loss run in chunks of tokens (`LOGIT_BUDGET` logits at a time),
   each giving its part of dL/dx at the last block's output;
3. from the last block down, block l is recomputed from its stored input with grad on, and one
   `autograd.grad` call returns dL/dx_in (the next block's upstream gradient) and dL/dh.

The gradients are exactly those of full backpropagation (the blocks form a chain); the price is
one more forward of the blocks. Given capture's residual stream (`residual`, capture.residual), step 1
is not run at all: every block input, and the last block's output, is read from it, so the whole pass
costs one forward with grad and one backward, at the same one-block memory. Without it,
`graph_blocks` buys part of the recomputation back with memory: the last
`graph_blocks` blocks keep their graph from the first forward and are not recomputed, so memory
grows by that many blocks' activations (a constant, not the model's depth). The same
recomputation gives h with the clusters known, so the cluster centres at down_proj's input
(FANG's distance matrix D) are accumulated here too.

The blocks, and so h and dL/dh, run in the model's dtype (model.compute_dtype); h * dL/dh, the
block sensitivity and every sum are formed in float32 and accumulated in float64.
"""

from __future__ import annotations

import torch
import zarr
from torch import nn

from ..core.errors import require
from ..core.progress import progress
from ..model.layerwise import BlockRunner, batch_slices
from ..model.modeling import decoder_layers
from ..model.offload import block_stream, place_model

# Logit entries (tokens x vocabulary) computed at once in the loss: 2^24 floats = 64 MiB per copy
LOGIT_BUDGET = 1 << 24


def scatter_cluster_sum(values: torch.Tensor, clusters: torch.Tensor, k: int) -> torch.Tensor:
    """Sum rows of values [T, n] into k buckets by cluster id [T] -> [k, n] (float64)."""
    out = torch.zeros(k, values.shape[-1], dtype=torch.float64, device=values.device)
    out.index_add_(0, clusters.to(values.device), values.double())
    return out


def _final_norm(model: nn.Module) -> nn.Module:
    return model.model.norm


def loss_grad(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, budget: int | None = None) -> torch.Tensor:
    """dL/dhidden for the last block's output [b, L, d], L the summed next-token cross-entropy of `ids`.

    Chunked over tokens so at most `budget` logits exist at once; the norm is per token, so
    chunks are independent. The last position predicts nothing: its gradient is zero.
    """
    norm, head = _final_norm(model), model.get_output_embeddings()
    b, seq_len, d = hidden.shape
    x = hidden[:, :-1].reshape(-1, d)
    target = ids[:, 1:].reshape(-1).to(hidden.device)
    rows = max(1, (budget or LOGIT_BUDGET) // head.out_features)
    grad = torch.zeros_like(hidden)
    g_flat = torch.empty_like(x)
    with torch.enable_grad():
        for start in range(0, x.shape[0], rows):
            xc = x[start : start + rows].detach().requires_grad_(True)
            logits = head(norm(xc)).float()
            loss = nn.functional.cross_entropy(logits, target[start : start + rows], reduction="sum")
            (g_flat[start : start + rows],) = torch.autograd.grad(loss, xc)
    grad[:, :-1] = g_flat.view(b, seq_len - 1, d)
    return grad


class _ResidualInputs:
    """One batch's block inputs read from capture's residual stream, last block first (the list's `pop`)."""

    def __init__(self, residual: zarr.Array, rows: slice, shape: tuple[int, int]):
        self.residual, self.rows, self.shape = residual, rows, shape
        self.next = residual.shape[0] - 1  # the last block's output; each pop() steps down to a block's input

    def block_input(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.residual[index, self.rows]).view(*self.shape, -1)

    def pop(self) -> torch.Tensor:
        self.next -= 1
        return self.block_input(self.next)


def _block_with_graph(runner: BlockRunner, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(x_in, x_out, h) of one block run with grad on from input x; h is down_proj's input, graph attached."""
    x_in = x.to(runner.device).detach().requires_grad_(True)
    caught: list[torch.Tensor] = []  # h with its graph (not detached, unlike input_hooks)
    handle = layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: caught.append(a[0]))
    try:
        with torch.enable_grad():
            x_out = runner(layer, x_in)
    finally:
        handle.remove()
    return x_in, x_out, caught.pop()


def taylor_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    token_clusters: torch.Tensor,
    k: int,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    graph_blocks: int = 0,
    residual: zarr.Array | None = None,
) -> dict[str, torch.Tensor]:
    """Per-layer cluster-neuron scores [n_layers, k, n_ffn], block sensitivity [n_layers], cluster centres.

    token_clusters [n_layers, N * L] holds each calibration token's cluster id in each layer.
    Block sensitivity is the first-order loss change from removing a block's update,
    mean over tokens of |<x_out - x_in, dL/dx_out>|: the `taylor` sparsity-allocation mode.
    `down_centers` [n_layers, k, n_ffn] is the mean down_proj input of each cluster's tokens (zero
    for an empty cluster), from the model's own precision rather than the fp16 capture.
    `residual` [n_layers + 1, N * L, d] is capture's float32 residual stream for these tokens: block
    inputs are read from it instead of computed (`graph_blocks` then has nothing to save and is unused).
    """
    device = torch.device(device)
    place_model(model, device)
    layers = decoder_layers(model)
    n_layers, n_ffn = len(layers), model.config.intermediate_size
    require(graph_blocks >= 0, f"taylor.graph_blocks={graph_blocks} must be 0 or more")
    require(graph_blocks == 0 or block_stream(model) is None,
            "taylor.graph_blocks > 0 keeps those blocks' weights on the device with their graphs, which "
            "model.offload exists to avoid: set one of them to 0 / none")
    n_seq, seq_len = input_ids.shape
    if residual is not None:
        want = (n_layers + 1, n_seq * seq_len, model.config.hidden_size)
        require(tuple(residual.shape) == want,
                f"the residual stream has shape {tuple(residual.shape)}, these tokens need {want}: rerun capture")
        graph_blocks = 0  # every block input is read: no first forward, so no graph to keep from it
    first_graph = n_layers - min(graph_blocks, n_layers)  # blocks from here on keep their first-pass graph
    sums = torch.zeros(n_layers, k, n_ffn, dtype=torch.float64)
    h_sums = torch.zeros(n_layers, k, n_ffn, dtype=torch.float64)
    sensitivity = torch.zeros(n_layers, dtype=torch.float64)
    counts = torch.zeros(n_layers, k, dtype=torch.float64)
    clusters_all = token_clusters.view(n_layers, n_seq, seq_len).long()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # only activation gradients are needed, not weight gradients
    runner = BlockRunner(model, device)
    try:
        with progress() as bar:
            task = bar.add_task("taylor (fwd+bwd)", total=n_seq * n_layers)
            for sl in batch_slices(n_seq, batch_size):
                ids = input_ids[sl].to(device)
                clusters = clusters_all[:, sl].reshape(n_layers, -1).to(device)
                counts += torch.stack([torch.bincount(c, minlength=k) for c in clusters.cpu()]).double()
                rows = slice(sl.start * seq_len, sl.stop * seq_len)
                if residual is not None:
                    inputs = _ResidualInputs(residual, rows, (sl.stop - sl.start, seq_len))
                    # the last block's output, as the blocks would hand it over (device, compute dtype)
                    hidden = inputs.block_input(n_layers).to(device=runner.device, dtype=runner.dtype)
                else:
                    with torch.no_grad():
                        hidden = runner.embed(ids)
                        inputs = []  # block inputs on the host: all that is kept across blocks
                        for li, layer in enumerate(layers[:first_graph]):
                            inputs.append(hidden.cpu())
                            # with model.offload every block visits the device twice per batch: here and below
                            with runner.on_device(li):
                                hidden = runner(layer, hidden)
                graphs = {}  # block -> (x_in, x_out, h) with the graph of the first pass
                for li in range(first_graph, n_layers):
                    graphs[li] = _block_with_graph(runner, layers[li], hidden)
                    hidden = graphs[li][1].detach()
                grad = loss_grad(model, hidden, ids)
                del hidden
                for li in reversed(range(n_layers)):
                    # the backward reads the block's weights too: they stay on the device until it is done
                    with runner.on_device(li):
                        if li in graphs:
                            x_in, x_out, h = graphs.pop(li)
                        else:
                            x_in, x_out, h = _block_with_graph(runner, layers[li], inputs.pop())
                        # products and sums in float32 whatever the blocks run in (model.compute_dtype)
                        update = x_out.detach().float() - x_in.detach().float()
                        sensitivity[li] += (update * grad.float()).sum(-1).abs().sum().double().cpu()
                        del update
                        grad_in, grad_h = torch.autograd.grad(x_out, (x_in, h), grad)
                    h_flat, c = h.detach().reshape(-1, n_ffn).float(), clusters[li]
                    sums[li] += scatter_cluster_sum((h_flat * grad_h.reshape(-1, n_ffn).float()).abs(), c, k).cpu()
                    h_sums[li] += scatter_cluster_sum(h_flat, c, k).cpu()
                    grad = grad_in
                    del x_in, x_out, h, grad_h
                    bar.advance(task, sl.stop - sl.start)
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    denom = counts.clamp_min(1.0).unsqueeze(-1)
    return {
        "scores": (sums / denom).float(),
        "token_counts": counts.long(),
        "block_sensitivity": (sensitivity / (n_seq * seq_len)).float(),
        "down_centers": (h_sums / denom).float(),
    }
