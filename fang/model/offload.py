"""Block weight streaming: decoder blocks wait off the device and visit it one at a time.

A model too big for the device (LLaMA-2-70B: 128.5 GiB of fp16 weights, one 80 GB GPU) can still
run block by block, because every block-sequential pass (capture, taylor, prune, `stream_mlp`)
needs only one block's weights at once. With `model.offload`:

  none  every weight on the device (the default; nothing here is used)
  host  the whole dense model is loaded into host RAM; each block is copied to the device when it
        runs and dropped from it after. Host RAM: the whole model in the dtype it is loaded in.
  disk  only the embeddings, final norm and LM head are loaded; a block's tensors are read from the
        memory-mapped safetensors file(s) when it runs and dropped after. Host RAM: one block
        while it is read, plus the page cache, which the kernel can reclaim. A block a method
        modified (prune) is written to a spill directory as it leaves the device (`spill`), or,
        without one, waits on the host.

Either way, while a block is not running its module holds meta tensors (shapes only, no memory),
so "at most one block on the device" is a property tests can check (`resident_blocks`). A block a
method changed (prune: compensation, shrinking) is kept when it leaves the device (`keep=True`: to the
spill directory or the host), and `save_pruned` writes a streamed model one block at a time
(`BlockStream.block_state`); `gather_blocks` would put the whole model back on the host.

The weights that run are the same bits as without streaming (copies between host and device are
exact, and disk mode converts each tensor to the load dtype as `from_pretrained` does), so results
are identical, not just close.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..core.errors import FangError, require
from ..core.integrity import check_dense_weights, check_safetensors_dir, read_config
from .modeling import DTYPE_BY_NAME, check_supported, decoder_layers, load_dense, tied_names

# where BlockStream is kept on the model: an attribute, so every pass that receives the model
# (capture, taylor, prune, stream_mlp) finds it without a new argument through every call chain
_ATTR = "_fang_block_stream"

State = dict[str, torch.Tensor]


class BlockStream:
    """The blocks of one model: which one is on the device now, and where the others wait."""

    def __init__(self, model: nn.Module, device: torch.device, host: dict[int, State],
                 disk: "SafetensorsBlocks | None" = None, dtype: torch.dtype | None = None,
                 spill: Path | None = None):
        self.layers = decoder_layers(model)
        self.device = device
        self.host = host  # blocks whose weights wait in host RAM (all of them in host mode; modified ones in disk mode without spill)
        self.disk = disk  # the checkpoint the other blocks are read from (disk mode)
        self.dtype = dtype  # disk mode: the dtype the model is loaded in (load_dense's dtype)
        # disk mode with a spill directory: a modified block (prune) is written there as it leaves the device,
        # instead of waiting in host RAM, and read back from there (save_pruned reads it one block at a time)
        self.spill = None if spill is None else Path(spill)
        self.spilled: dict[int, Path] = {}
        self.current: int | None = None

    def _state(self, index: int, device: torch.device | None = None) -> State:
        device = self.device if device is None else device
        if index in self.host:
            return {k: v.to(device) for k, v in self.host[index].items()}
        if index in self.spilled:  # written by this stream: already in the model's dtype
            return _read_file(self.spilled[index], device)
        require(self.disk is not None, f"block {index}'s weights are nowhere: neither on the host nor on disk")
        return self.disk.read(index, device, self.dtype)

    def block_state(self, index: int) -> State:
        """Block `index`'s weights on the host, wherever they wait (`save_pruned` writes them one block at a time)."""
        layer = self.layers[index]
        if self.current == index:
            return {k: v.detach().to("cpu") for k, v in layer.state_dict().items()}
        return self._state(index, torch.device("cpu"))

    def fetch(self, index: int) -> nn.Module:
        """Block `index` with its weights on the device."""
        # refused rather than evicting the other block: that one may hold changes not yet kept
        require(self.current is None, f"block {self.current} is still on the device: streaming holds one block "
                                      f"at a time, so block {index} cannot join it")
        layer = self.layers[index]
        # assign=True makes the loaded tensors the parameters (no second copy); requires_grad stays the module's
        layer.load_state_dict(self._state(index), strict=True, assign=True)
        self.current = index
        return layer

    def release(self, index: int, keep: bool = False) -> None:
        """Drop block `index` from the device; `keep` first copies its (modified) weights to the host."""
        layer = self.layers[index]
        if keep:
            state = {k: v.detach().to("cpu") for k, v in layer.state_dict().items()}
            if self.spill is not None:
                self.spilled[index] = _write_file(state, self.spill / f"block-{index:05d}.safetensors")
                self.host.pop(index, None)
            else:
                self.host[index] = state
            del state
        layer.to("meta")  # shapes stay for parameter counts and the structure; the memory goes
        if self.current == index:
            self.current = None


def block_stream(model: nn.Module) -> BlockStream | None:
    """The model's BlockStream, or None when its blocks are not streamed (model.offload=none)."""
    return model.__dict__.get(_ATTR)


@contextlib.contextmanager
def block_on_device(model: nn.Module, index: int, keep: bool = False) -> Iterator[nn.Module]:
    """Block `index` of `model`, with its weights on the device for the body of the `with`.

    Without streaming it is just the block. With streaming the block is fetched before and released
    after; `keep=True` is for a body that modifies the block (prune), whose result must survive.
    Nested for the same block, the inner one does nothing (the outer one's `keep` decides).
    """
    stream = block_stream(model)
    if stream is None or stream.current == index:
        yield decoder_layers(model)[index]
        return
    layer = stream.fetch(index)
    try:
        yield layer
    finally:
        stream.release(index, keep=keep)


@contextlib.contextmanager
def streamed_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Within the `with`, any forward of a streamed model fetches each decoder block when it starts
    and releases it when it ends: an unmodified Hugging Face forward (perplexity, lm-eval, generate)
    then runs with one block on the device. A block already on the device (an outer
    `block_on_device`) is left to its owner. Nothing happens for a model that is not streamed."""
    stream = block_stream(model)
    if stream is None:
        yield model
        return
    fetched: set[int] = set()

    def before(index: int):
        def hook(module, args):
            if stream.current != index:
                stream.fetch(index)
                fetched.add(index)
        return hook

    def after(index: int):
        def hook(module, args, output):
            if index in fetched:
                fetched.discard(index)
                stream.release(index)
        return hook

    handles = []
    for i, layer in enumerate(stream.layers):
        handles += [layer.register_forward_pre_hook(before(i)), layer.register_forward_hook(after(i))]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for i in sorted(fetched):  # a forward that raised half-way leaves its block behind
            stream.release(i)


def require_resident(model: nn.Module, layer: nn.Module) -> None:
    """A clear error, instead of a meta-tensor failure deep in torch, for a block run without its weights."""
    stream = block_stream(model)
    if stream is not None and (stream.current is None or stream.layers[stream.current] is not layer):
        raise FangError("a decoder block ran while its weights were off the device: the caller must wrap it in "
                        "`block_on_device(model, index)` (model.offload streams blocks)")


def resident_blocks(model: nn.Module) -> list[int]:
    """Indices of the blocks that hold real (non-meta) tensors now: what tests check stays at most one."""
    return [i for i, layer in enumerate(decoder_layers(model))
            if any(t.device.type != "meta" for t in layer.state_dict().values())]


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """`model.to(device).eval()`, or for a streamed model a check that it streams to `device`
    (moving it whole would be the very thing streaming avoids)."""
    stream = block_stream(model)
    if stream is None:
        return model.to(device).eval()
    require(stream.device == torch.device(device),
            f"the model streams its blocks to {stream.device}, but this pass runs on {device}: "
            "load it with that device")
    return model.eval()


def _move_outside_blocks(model: nn.Module, device: torch.device | str) -> None:
    """Move everything but the decoder blocks (embeddings, rotary buffers, final norm, LM head) to `device`."""
    inner = model.model
    layers = inner.layers
    inner.layers = nn.ModuleList()  # hidden from .to() for a moment; tied weights stay tied
    try:
        model.to(device)
    finally:
        inner.layers = layers


def _check_streamable(model: nn.Module) -> None:
    # a non-persistent buffer is not in a block's state dict, so it could not come back after `to("meta")`
    for i, layer in enumerate(decoder_layers(model)):
        lost = sorted(set(dict(layer.named_buffers())) - set(layer.state_dict()))
        require(not lost, f"block {i} has non-persistent buffers {lost}: model.offload cannot stream this model")


def stream_from_host(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Stream the blocks of a model loaded on the host (model.offload=host): they stay in host RAM,
    everything else moves to `device`."""
    device = torch.device(device)
    require(block_stream(model) is None, "the model already streams its blocks")
    _check_streamable(model)
    host = {}
    for i, layer in enumerate(decoder_layers(model)):
        host[i] = {k: v.detach().to("cpu") for k, v in layer.state_dict().items()}
        layer.to("meta")
    _move_outside_blocks(model, device)
    model.__dict__[_ATTR] = BlockStream(model, device, host)
    return model.eval()


def gather_blocks(model: nn.Module) -> nn.Module:
    """End streaming: every block back in its module, the whole model on the host.

    Host RAM: the whole model as it is now (after a prune, the pruned model). `save_pruned` does not
    need it: it writes a streamed model one block at a time."""
    stream = block_stream(model)
    if stream is None:
        return model
    cpu = torch.device("cpu")
    stream.device = cpu
    for i, layer in enumerate(stream.layers):
        layer.load_state_dict(stream._state(i), strict=True, assign=True)
        stream.host.pop(i, None)
        stream.spilled.pop(i, None)
    del model.__dict__[_ATTR]
    return model.to(cpu).eval()


# ----------------------------------------------------------------------------------------------------------------------
# disk mode: the dense checkpoint's safetensors files, read one block at a time


class SafetensorsBlocks:
    """The block tensors of a safetensors checkpoint (one file or shards with an index), by block index."""

    def __init__(self, path: Path, prefix: str, names_by_block: list[list[str]]):
        from safetensors import safe_open

        self.prefix = prefix  # e.g. "model.layers": block i's tensors are "<prefix>.<i>.<name>"
        files = sorted(path.glob("*.safetensors"))
        require(files, f"{path} holds no *.safetensors file: model.offload=disk reads the blocks from them")
        self.file_of: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                self.file_of.update({k: f for k in fh.keys()})
        self.names_by_block = names_by_block
        missing = [self.key(i, n) for i, names in enumerate(names_by_block) for n in names
                   if self.key(i, n) not in self.file_of]
        require(not missing, f"{path}: the checkpoint has no tensors {missing[:3]}{'...' if len(missing) > 3 else ''} "
                             "for the model's blocks (its names differ): use model.offload=host")

    def key(self, index: int, name: str) -> str:
        return f"{self.prefix}.{index}.{name}"

    def read(self, index: int, device: torch.device, dtype: torch.dtype | None) -> State:
        """Block `index`'s tensors on `device`, floats in `dtype` (what from_pretrained would give)."""
        from safetensors import safe_open

        out: State = {}
        by_file: dict[Path, list[str]] = {}
        for name in self.names_by_block[index]:
            by_file.setdefault(self.file_of[self.key(index, name)], []).append(name)
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt") as fh:  # memory-mapped: only these tensors are read
                for name in names:
                    t = fh.get_tensor(self.key(index, name))
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[name] = t.to(device)
        return out


def layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    return next(name for name, m in model.named_modules() if m is layers)


def load_for_block_passes(path: str | os.PathLike, device: torch.device | str, model_params,
                          spill: str | os.PathLike | None = None):
    """The dense model as every block pass loads it (capture, taylor, prune, ica, gprune, attribute, the
    bench): in model.compute_dtype resolved for `device`, its blocks waiting where model.offload says.
    `model_params` is the params.yaml `model` block. Returns (model, tokenizer, dtype name)."""
    from ..core.device import resolve_compute_dtype

    dtype = resolve_compute_dtype(model_params.compute_dtype, device)
    model, tokenizer = load_dense_offloaded(path, device, dtype, offload=model_params.offload, spill=spill)
    return model, tokenizer, dtype


def load_dense_offloaded(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: str = "float32",
                         offload: str = "none", spill: str | os.PathLike | None = None):
    """`load_dense` with model.offload: "none" is load_dense itself (the whole model on `device`);
    "host" loads it into host RAM and streams the blocks; "disk" loads only the non-block weights and
    reads each block from the safetensors files when it runs. `spill` (disk mode, for a pass that
    modifies blocks: prune) is a directory where modified blocks are written as they leave the
    device instead of waiting in host RAM. Returns (model, tokenizer)."""
    # the names fang.core.params.OFFLOADS validates (not imported: it would make every stage that runs
    # blocks, summary included, depend on params.py; tests/test_offload.py checks the two agree)
    require(offload in ("none", "host", "disk"), f"model.offload={offload!r}: use one of none, host, disk")
    if offload == "none":
        return load_dense(path, device, dtype)
    if offload == "host":
        model, tokenizer = load_dense(path, "cpu", dtype)
        return stream_from_host(model, device), tokenizer
    from transformers import AutoTokenizer

    path = Path(path)
    # the checks load_dense makes first: a wrong model or a cut file fails before anything is read
    config = read_config(path)
    check_supported(config)
    check_dense_weights(path, config, check_safetensors_dir(path))
    try:
        model = _load_outside_blocks(path, device, dtype, spill)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise FangError(f"could not load the model at {path}: {str(exc).strip().splitlines()[0][:300]}") from None
    check_supported(model.config)
    return model, tokenizer


def _load_outside_blocks(path: Path, device: torch.device | str, dtype: str,
                         spill: str | os.PathLike | None = None) -> nn.Module:
    """The dense model of checkpoint `path` with only its non-block weights loaded (on `device`), its
    blocks streamed from the safetensors files."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    # parameters on meta (no memory, no random init); buffers stay real: the rotary inv_freq is
    # computed in __init__ and is not in the checkpoint
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPE_BY_NAME[dtype])
    return stream_from_disk(model, path, device, DTYPE_BY_NAME[dtype], spill=spill)


def stream_from_disk(model: nn.Module, path: Path, device: torch.device | str, dtype: torch.dtype,
                     tied: dict[str, str] | None = None, spill: str | os.PathLike | None = None) -> nn.Module:
    """Stream the blocks of `model`, a skeleton whose parameters are on meta with the checkpoint's shapes
    (a dense one, or a pruned one reshaped by its structure.json), from the safetensors file(s) of `path`:
    the non-block weights are read (converted to `dtype`) and moved to `device`, each block is read when it runs."""
    from transformers import GenerationConfig

    device = torch.device(device)
    _check_streamable(model)
    prefix = layers_prefix(model)
    layers = decoder_layers(model)
    names = [list(layer.state_dict()) for layer in layers]
    disk = SafetensorsBlocks(path, prefix, names)
    tied = tied_names(model) if tied is None else tied
    wanted = [k for k in model.state_dict() if not k.startswith(prefix + ".") and k not in tied]
    missing = [k for k in wanted if k not in disk.file_of]
    require(not missing, f"{path}: the checkpoint has no tensors {missing[:3]} (embeddings / norm / head)")
    outside = _read_tensors(disk.file_of, wanted, dtype)
    model.load_state_dict(outside, strict=False, assign=True)
    for alias, source in tied.items():  # e.g. lm_head.weight is embed_tokens.weight
        module_name, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(module_name), attr, model.get_parameter(source))
    if (path / "generation_config.json").exists():  # what from_pretrained attaches, so a saved prune matches
        model.generation_config = GenerationConfig.from_pretrained(path)
    _move_outside_blocks(model, device)
    model.__dict__[_ATTR] = BlockStream(model, device, {}, disk, dtype, spill)
    return model.eval()


def _read_tensors(file_of: dict[str, Path], keys: list[str], dtype: torch.dtype) -> State:
    from safetensors import safe_open

    out: State = {}
    for f in sorted({file_of[k] for k in keys}):
        with safe_open(str(f), framework="pt") as fh:
            for k in keys:
                if file_of[k] == f:
                    t = fh.get_tensor(k)
                    out[k] = t.to(dtype) if t.is_floating_point() else t
    return out



def _write_file(state: State, path: Path) -> Path:
    """`state` as one safetensors file at `path`, written to a temp name and renamed."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def _read_file(path: Path, device: torch.device) -> State:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k).to(device) for k in fh.keys()}
