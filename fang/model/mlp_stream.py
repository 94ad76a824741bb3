"""One dense pass over the calibration set, block by block, handing each MLP's gate and up activations to a consumer.

Like `capture`, only one block's hidden states for the whole calibration set live in RAM; unlike
it, nothing is written: the consumer reduces each layer's activations as they stream past (the
ICA stage keeps one layer's [T, 2 n_ffn] matrix, GPrune only per-source moments).
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
from torch import Tensor, nn

from ..core.progress import progress
from .layerwise import BlockRunner, batch_slices
from .modeling import decoder_layers
from .offload import place_model


class MlpConsumer(Protocol):
    def add(self, layer: int, rows: slice, act: Tensor, up: Tensor) -> None:
        """act = act_fn(gate_proj(x)) and up = up_proj(x) of token rows `rows`, each [tokens, n_ffn]."""

    def end_layer(self, layer: int, mlp: nn.Module) -> None:
        """Every token of `layer` has been seen."""


@torch.no_grad()
def stream_mlp(model: nn.Module, input_ids: Tensor, consumer: MlpConsumer, batch_size: int = 8,
               device: torch.device | str = "cpu", label: str = "mlp") -> dict[str, float]:
    """Run the dense model over `input_ids` [N, L]; returns wall and CPU seconds spent in blocks and in the consumer."""
    device = torch.device(device)
    place_model(model, device)
    n_seq, seq_len = input_ids.shape
    runner = BlockRunner(model, device)
    layers = decoder_layers(model)
    hidden = torch.empty(n_seq, seq_len, model.config.hidden_size, dtype=torch.float32)
    for sl in batch_slices(n_seq, batch_size):
        hidden[sl] = runner.embed(input_ids[sl]).float().cpu()
    # wall and CPU seconds: on a shared machine the CPU time is the comparable cost
    timing = {"forward_s": 0.0, "consumer_s": 0.0, "forward_cpu_s": 0.0, "consumer_cpu_s": 0.0}
    with progress() as bar:
        task = bar.add_task(label, total=len(layers) * n_seq)
        for li, layer in enumerate(layers):
            # the consumer's end_layer sees the block's weights too, so it runs while they are on the device
            with runner.on_device(li):
                _stream_block(runner, li, layer, hidden, consumer, batch_size, timing, lambda n: bar.advance(task, n))
    return timing


def _stream_block(runner: BlockRunner, li: int, layer: nn.Module, hidden: Tensor, consumer: MlpConsumer,
                  batch_size: int, timing: dict[str, float], advance) -> None:
    """Block `li` over every batch of `hidden` (updated in place to its outputs), then the consumer's end_layer."""
    n_seq, seq_len = hidden.shape[:2]
    mlp = layer.mlp
    seen: dict[str, Tensor] = {}
    # gate is hooked, not act_fn: act_fn may be a shared functional, and applying it here is exact
    handles = [mlp.gate_proj.register_forward_hook(lambda _m, _a, out: seen.__setitem__("gate", out)),
               mlp.up_proj.register_forward_hook(lambda _m, _a, out: seen.__setitem__("up", out))]
    try:
        for sl in batch_slices(n_seq, batch_size):
            t0, c0 = time.perf_counter(), time.process_time()
            out = runner(layer, hidden[sl])
            hidden[sl] = out.float().cpu()
            t1, c1 = time.perf_counter(), time.process_time()
            rows = slice(sl.start * seq_len, sl.stop * seq_len)
            n_ffn = seen["up"].shape[-1]
            consumer.add(li, rows, mlp.act_fn(seen["gate"]).reshape(-1, n_ffn).float(),
                         seen["up"].reshape(-1, n_ffn).float())
            seen.clear()
            timing["forward_s"] += t1 - t0
            timing["forward_cpu_s"] += c1 - c0
            timing["consumer_s"] += time.perf_counter() - t1
            timing["consumer_cpu_s"] += time.process_time() - c1
            advance(sl.stop - sl.start)
    finally:
        for h in handles:
            h.remove()
    t0, c0 = time.perf_counter(), time.process_time()
    consumer.end_layer(li, mlp)
    timing["consumer_s"] += time.perf_counter() - t0
    timing["consumer_cpu_s"] += time.process_time() - c0
