"""Sequential, block-by-block execution of a decoder over calibration data.

Only one block's activations for the whole calibration set live in memory at a time: block l's
outputs become block l+1's inputs. Both `capture` and every pruning method use this driver.
When the model streams its blocks (model.offload, `fang.model.offload`), a caller runs block l
inside `runner.on_device(l)`, which brings its weights to the device and drops them after.

Blocks run in the model's own dtype (model.compute_dtype: the stages load the model in it). Hidden
states kept between blocks on the host are float32 (a bfloat16/float16 output converts to float32
exactly) and are cast to the model's dtype as they enter a block; every statistic a pass collects
from hooks is converted to float32 or float64 by its accumulator before it is summed.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from .modeling import decoder_layers
from .offload import block_on_device, require_resident


class _Stop(Exception):
    pass


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def first_block_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run the model up to block 0 and return (hidden_states, keyword args block 0 receives).

    The keyword args (rotary position embeddings, causal mask, position ids) depend only on the
    batch shape, so they are reused for every block and every batch of the same shape.
    """
    layers = decoder_layers(model)
    caught: dict = {}

    def hook(_module, args, kwargs):
        caught["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return caught["hidden"], caught["kwargs"]


class BlockRunner:
    """Runs single decoder blocks on batches of hidden states, caching block kwargs per batch shape."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.device = device
        # the dtype block inputs are cast to: the model's (its embeddings'), i.e. model.compute_dtype
        self.dtype = model.get_input_embeddings().weight.dtype
        self._kwargs: dict[tuple[int, int], dict] = {}

    def kwargs_for(self, batch: int, seq_len: int) -> dict:
        key = (batch, seq_len)
        if key not in self._kwargs:
            dummy = torch.zeros(batch, seq_len, dtype=torch.long, device=self.device)
            self._kwargs[key] = first_block_inputs(self.model, dummy)[1]
        return self._kwargs[key]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return first_block_inputs(self.model, input_ids.to(self.device))[0]

    def on_device(self, index: int, keep: bool = False) -> contextlib.AbstractContextManager[nn.Module]:
        """Block `index` with its weights on the device for the `with` body (a no-op without streaming);
        `keep=True` when the body modifies the block, so the change survives its leaving the device."""
        return block_on_device(self.model, index, keep)

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        require_resident(self.model, layer)
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        out = layer(hidden, **self.kwargs_for(hidden.shape[0], hidden.shape[1]))
        return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def embed_tokens(model: nn.Module, input_ids: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Block 0's input [N, L, d] (float32, host) for token ids [N, L], computed batch by batch in the
    model's dtype."""
    runner = BlockRunner(model, device)
    n_seq, seq_len = input_ids.shape
    out = torch.empty(n_seq, seq_len, model.config.hidden_size, dtype=torch.float32)
    for sl in batch_slices(n_seq, batch_size):
        out[sl] = runner.embed(input_ids[sl]).float().cpu()
    return out


@contextlib.contextmanager
def input_hooks(modules: dict[str, nn.Module], sink: Callable[[str, torch.Tensor], None]):
    """Call sink(name, input) with the input of each named module during forward passes."""
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: sink(name, args[0].detach()))
        for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
