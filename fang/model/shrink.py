"""Physically shrinking LLaMA-style blocks (smaller nn.Linear shapes, not masks) and the pruned-model format.

A pruned checkpoint is a directory holding:
- `model.safetensors`: the pruned state dict (safetensors only; tied weights stored once), or, when
  the model was streamed (model.offload) or `save_pruned(shards=True)`, Hugging Face's sharded layout:
  one `model-0000i-of-0000n.safetensors` per decoder block, the last one with the embeddings, final
  norm and head, and `model.safetensors.index.json` mapping every tensor to its file (written one
  block at a time: the whole state dict is never on the host);
- `config.json` (+ `generation_config.json`): the *dense* architecture it came from;
- the tokenizer files;
- `structure.json`: the per-layer shapes that turn the dense architecture into the pruned one;
- `configuration_fang_pruned.py`, `modeling_fang_pruned.py` and, in config.json, the same per-layer
  shapes (`pruned_layers`) and an `auto_map`: stock transformers loads the directory with
  `trust_remote_code=True`, without fang (see `fang.model.portable`).

`load_pruned` is the only loader: it rebuilds the dense architecture without allocating it (meta
device), reshapes every block from `structure.json`, then loads the weights strictly. No pickle.

Notes on transformers 5.x attention (LlamaAttention, Qwen2Attention, MistralAttention):
- q/k/v outputs are reshaped with `view(..., -1, head_dim)`, so head counts follow the Linear shapes;
- eager and sdpa attention repeat K/V by `module.num_key_value_groups`, the only head-count
  attribute the module keeps, so that is what must change when query heads per KV head change;
- the shared `config` is never edited: it still describes the dense model (every layer can differ).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.atomic import atomic_dir
from ..core.errors import FangError, require
from ..core.integrity import check_safetensors, file_sha256, read_config
from .modeling import (
    DTYPE_BY_NAME, check_supported, count_block_params, decoder_layers, load_dense, save_tokenizer, tied_names,
)
from .offload import block_stream, layers_prefix, load_dense_offloaded, stream_from_disk, stream_from_host
from .portable import write_portable_code

STRUCTURE_FILE = "structure.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # the sharded layout's tensor -> file map (Hugging Face's name)
STRUCTURE_FORMAT = 1
KEPT_ATTR = "kept_neurons"  # MLP attribute and optional structure.json layer key: dense indices of the kept neurons

# head-count attributes some attention implementations carry besides num_key_value_groups
_QUERY_HEAD_ATTRS = ("num_heads", "num_attention_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads")


# ----------------------------------------------------------------------------------------------------------------------
# building Linear layers


def _linear_like(weight: Tensor, bias: Tensor | None, requires_grad: bool = True) -> nn.Linear:
    """An nn.Linear holding exactly `weight` [out, in] and `bias` [out] (no random init is paid)."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(dtype=weight.dtype, device=weight.device), requires_grad=requires_grad)
    return layer


def _combine_bias(existing: Tensor | None, extra: Tensor | None, weight: Tensor, name: str) -> Tensor | None:
    """existing + extra, computed in float64 and stored in the weight's dtype; None when both are absent."""
    if extra is None:
        return None if existing is None else existing.detach().clone()
    out_features = weight.shape[0]
    require(
        extra.numel() == out_features,
        f"{name}: extra bias has {extra.numel()} entries, layer has {out_features} outputs",
    )
    total = extra.detach().reshape(-1).to(device=weight.device, dtype=torch.float64)
    if existing is not None:
        total = total + existing.detach().to(torch.float64)
    return total.to(weight.dtype)


def _rows(linear: nn.Linear, rows: Tensor) -> nn.Linear:
    rows = rows.to(linear.weight.device)
    bias = None if linear.bias is None else linear.bias.detach().index_select(0, rows)
    return _linear_like(linear.weight.detach().index_select(0, rows), bias, linear.weight.requires_grad)


def _cols(linear: nn.Linear, cols: Tensor, extra_bias: Tensor | None, name: str) -> nn.Linear:
    cols = cols.to(linear.weight.device)
    weight = linear.weight.detach().index_select(1, cols)
    return _linear_like(weight, _combine_bias(linear.bias, extra_bias, weight, name), linear.weight.requires_grad)


def _as_index(keep, size: int, what: str) -> Tensor:
    """Validate a keep list: 1-D, in range, no duplicates; returned sorted (unit order is irrelevant)."""
    keep = torch.as_tensor(keep, dtype=torch.long).reshape(-1).cpu()
    require(keep.numel() > 0, f"cannot keep zero {what}: a block needs at least one to run")
    require(bool(((keep >= 0) & (keep < size)).all()), f"{what} indices {keep.tolist()} out of range [0, {size})")
    sorted_keep = torch.sort(keep).values
    require(bool((sorted_keep[1:] != sorted_keep[:-1]).all()), f"{what} indices contain duplicates: {keep.tolist()}")
    return sorted_keep


def _unit_rows(units: Tensor, width: int) -> Tensor:
    """Row indices of whole units (heads) of `width` consecutive rows."""
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


# ----------------------------------------------------------------------------------------------------------------------
# shrinking


@torch.no_grad()
def shrink_mlp(mlp: nn.Module, keep: Tensor, extra_down_bias: Tensor | None = None) -> None:
    """Keep neurons `keep` of a gated MLP: rows of gate/up, columns of down, in place.

    `extra_down_bias` (e.g. FLAP's compensation) is added to down_proj's bias, creating one when the
    model has none (LLaMA) — the loader learns that from `block_structure(...)["down_bias"]`.
    """
    n = mlp.gate_proj.out_features
    keep = _as_index(keep, n, "MLP neurons")
    # build everything before assigning anything, so a rejected call leaves the block untouched
    down = _cols(mlp.down_proj, keep, extra_down_bias, "down_proj")
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = _rows(mlp.gate_proj, keep), _rows(mlp.up_proj, keep), down
    # original (dense) indices of the kept neurons, for removed-neuron accounting (fang.analysis.attribute);
    # composed so that a second shrink still names dense neurons
    prev = getattr(mlp, KEPT_ATTR, None)
    if prev is not None or keep.numel() < n:  # keeping all of a dense block needs no record
        setattr(mlp, KEPT_ATTR, keep if prev is None else prev[keep])
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = keep.numel()


def attention_heads(attn: nn.Module) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) as the module's current shapes say."""
    head_dim = getattr(attn, "head_dim", None)
    require(isinstance(head_dim, int) and head_dim > 0, f"{type(attn).__name__} has no integer head_dim attribute")
    n_heads, rem_q = divmod(attn.q_proj.out_features, head_dim)
    n_kv, rem_kv = divmod(attn.k_proj.out_features, head_dim)
    require(
        rem_q == 0 and rem_kv == 0 and n_kv > 0 and n_heads % n_kv == 0,
        f"inconsistent attention shapes in {type(attn).__name__}: q_proj {attn.q_proj.out_features}, "
        f"k_proj {attn.k_proj.out_features} outputs, head_dim {head_dim}",
    )
    return n_heads, n_kv, head_dim


def _set_head_counts(attn: nn.Module, n_heads: int, n_kv: int) -> None:
    attn.num_key_value_groups = n_heads // n_kv
    for name in _QUERY_HEAD_ATTRS:
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, n_heads)
    for name in _KV_HEAD_ATTRS:
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, n_kv)


@torch.no_grad()
def shrink_attention(attn: nn.Module, keep_kv: Tensor, keep_slots: Tensor, extra_o_bias: Tensor | None = None) -> None:
    """Keep KV heads `keep_kv` and, within every kept group, query slots `keep_slots`, in place.

    Query head h reads KV head h // g (g = query heads per KV head), at slot h % g. The kept query
    heads are {kv * g + s : kv in keep_kv, s in keep_slots}, ordered KV-major so that the new query
    head i still reads new KV head i // len(keep_slots). Two GQA schemes fit this:
    - "kv_group": drop whole KV groups with their queries (keep_slots = all slots);
    - "query_slot": keep every KV head, drop the same slots in every group (keep_kv = all).
    With MHA (g = 1) both are plain head pruning. `extra_o_bias` is added to o_proj's bias
    (created if absent).
    """
    n_heads, n_kv, head_dim = attention_heads(attn)
    g = n_heads // n_kv
    keep_kv = _as_index(keep_kv, n_kv, "KV heads")
    keep_slots = _as_index(keep_slots, g, "query slots")
    q_heads = (keep_kv[:, None] * g + keep_slots[None, :]).reshape(-1)
    q_rows = _unit_rows(q_heads, head_dim)
    kv_rows = _unit_rows(keep_kv, head_dim)
    # build everything before assigning anything, so a rejected call leaves the block untouched
    o_proj = _cols(attn.o_proj, q_rows, extra_o_bias, "o_proj")
    attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj = (
        _rows(attn.q_proj, q_rows),
        _rows(attn.k_proj, kv_rows),
        _rows(attn.v_proj, kv_rows),
        o_proj,
    )
    _set_head_counts(attn, q_heads.numel(), keep_kv.numel())


# ----------------------------------------------------------------------------------------------------------------------
# structure description


def block_structure(layer: nn.Module) -> dict:
    """Shapes of one decoder block that differ from the dense config after pruning."""
    attn, mlp = layer.self_attn, layer.mlp
    n_heads, n_kv, _ = attention_heads(attn)
    spec = {
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "intermediate_size": mlp.gate_proj.out_features,
        "o_bias": attn.o_proj.bias is not None,
        "down_bias": mlp.down_proj.bias is not None,
    }
    kept = getattr(mlp, KEPT_ATTR, None)
    if kept is not None:  # optional: absent for blocks never shrunk and in older checkpoints
        spec[KEPT_ATTR] = [int(i) for i in kept]
    return spec


def model_structure(model: nn.Module) -> list[dict]:
    return [block_structure(layer) for layer in decoder_layers(model)]


def _meta_linear(in_features: int, out_features: int, bias: bool, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=like.weight.dtype)


def apply_structure(layer: nn.Module, spec: dict, index: int) -> None:
    """Give a (meta, dense) block the shapes in `spec`; weights are loaded afterwards.

    q/k/v and gate/up bias flags are kept from the dense architecture (shrinking never changes
    them); o/down bias flags come from `spec` since compensation may have added those biases.
    """
    keys = ("n_heads", "n_kv_heads", "intermediate_size", "o_bias", "down_bias")
    missing = [k for k in keys if k not in spec]
    require(not missing, f"{STRUCTURE_FILE}: layer {index} lacks {', '.join(missing)}")
    attn, mlp = layer.self_attn, layer.mlp
    n_heads, n_kv, inter = int(spec["n_heads"]), int(spec["n_kv_heads"]), int(spec["intermediate_size"])
    require(
        n_kv > 0 and n_heads > 0 and n_heads % n_kv == 0 and inter > 0,
        f"{STRUCTURE_FILE}: layer {index} has an impossible shape "
        f"(heads={n_heads}, kv_heads={n_kv}, intermediate={inter})",
    )
    head_dim = attn.head_dim
    hidden = attn.q_proj.in_features
    attn.q_proj = _meta_linear(hidden, n_heads * head_dim, attn.q_proj.bias is not None, attn.q_proj)
    attn.k_proj = _meta_linear(hidden, n_kv * head_dim, attn.k_proj.bias is not None, attn.k_proj)
    attn.v_proj = _meta_linear(hidden, n_kv * head_dim, attn.v_proj.bias is not None, attn.v_proj)
    attn.o_proj = _meta_linear(n_heads * head_dim, hidden, bool(spec["o_bias"]), attn.o_proj)
    _set_head_counts(attn, n_heads, n_kv)
    mlp.gate_proj = _meta_linear(hidden, inter, mlp.gate_proj.bias is not None, mlp.gate_proj)
    mlp.up_proj = _meta_linear(hidden, inter, mlp.up_proj.bias is not None, mlp.up_proj)
    mlp.down_proj = _meta_linear(inter, hidden, bool(spec["down_bias"]), mlp.down_proj)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = inter
    if KEPT_ATTR in spec:  # so that a reloaded model saved again still records them
        setattr(mlp, KEPT_ATTR, torch.as_tensor(spec[KEPT_ATTR], dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------------
# save / load


def save_pruned(model: nn.Module, tokenizer, out_dir: str | os.PathLike, shards: bool | None = None) -> Path:
    """Write a pruned model as safetensors + dense config + tokenizer + structure.json, atomically.

    Weights are written with safetensors directly rather than `save_pretrained`, so the files hold
    exactly the state-dict names `load_pruned` expects (transformers may rename keys on save for
    some architectures). Tied aliases are stored once and listed under "tied" in structure.json.

    `shards` (default: whether the model streams its blocks, model.offload): one file per decoder
    block plus one for the rest, with `model.safetensors.index.json` (Hugging Face's sharded layout,
    which `from_pretrained` reads too); a streamed model's blocks are then read back and written one
    at a time, so the host never holds more than one block. Otherwise one `model.safetensors`.
    Both layouts hold the same tensors, and a streamed and an in-memory model write the same files.
    """
    from safetensors.torch import save_file

    stream = block_stream(model)
    shards = stream is not None if shards is None else shards
    require(shards or stream is None, "save_pruned: a streamed model (model.offload) is written in shards, one block "
                                      "at a time: give shards=True, or gather_blocks(model) first")
    out_dir = Path(out_dir)
    tied = tied_names(model)
    structure = {
        "format": STRUCTURE_FORMAT,
        "layers": model_structure(model),
        "params": {
            "block": count_block_params(model),
            "total": sum(p.numel() for p in model.parameters()),  # shared parameters counted once
        },
        "tied": tied,
    }
    with atomic_dir(out_dir) as tmp:
        if shards:
            structure["weights_sha256"] = _save_shards(model, tied, tmp)
        else:
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
            _require_loaded(state)
            save_file({k: v.cpu() for k, v in state.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            del state
            # flipped bytes in a tensor load without complaint: load_pruned compares this checksum
            structure["weights_sha256"] = file_sha256(tmp / WEIGHTS_FILE)
        model.config.save_pretrained(tmp)
        write_portable_code(tmp, structure["layers"])
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        with open(tmp / STRUCTURE_FILE, "w") as fh:
            json.dump(structure, fh, indent=2)
            fh.write("\n")
    return out_dir


def _require_loaded(state: dict[str, Tensor]) -> None:
    require(all(t.device.type != "meta" for t in state.values()),
            "save_pruned: the model still has weights on the meta device (not loaded)")


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _save_shards(model: nn.Module, tied: dict[str, str], out: Path) -> dict[str, str]:
    """Shard i < n_layers: block i; shard n_layers: everything else. Writes the index; returns {file: sha256}."""
    from safetensors.torch import save_file

    stream = block_stream(model)
    layers = decoder_layers(model)
    prefix = layers_prefix(model)
    n_files = len(layers) + 1
    weight_map: dict[str, str] = {}
    sha: dict[str, str] = {}
    total = 0

    def write(i: int, state: dict[str, Tensor]) -> None:
        nonlocal total
        _require_loaded(state)
        name = shard_name(i, n_files)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / name),
                  metadata={"format": "pt"})
        total += sum(v.numel() * v.element_size() for v in state.values())
        weight_map.update(dict.fromkeys(state, name))
        sha[name] = file_sha256(out / name)

    for i, layer in enumerate(layers):
        local = stream.block_state(i) if stream is not None else layer.state_dict()
        write(i, {f"{prefix}.{i}.{k}": v for k, v in local.items() if f"{prefix}.{i}.{k}" not in tied})
        del local  # one block on the host at a time
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix + ".") and k not in tied}
    write(len(layers), rest)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return sha


def weight_files(path: str | os.PathLike, structure: dict | None = None) -> dict[str, Path]:
    """Tensor name -> the safetensors file of a checkpoint directory (one file or the sharded layout),
    each file checked (complete; its recorded sha256 when `structure` lists one)."""
    from safetensors import safe_open

    path = Path(path)
    index_path = path / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            require(isinstance(weight_map, dict) and weight_map, "empty weight_map")
        except (ValueError, KeyError, TypeError, FangError):
            raise FangError(f"{index_path} is not a valid index (a JSON object with a 'weight_map')") from None
        files = sorted(set(weight_map.values()))
    else:
        require((path / WEIGHTS_FILE).exists(), f"{path} is incomplete: {WEIGHTS_FILE} is missing")
        files, weight_map = [WEIGHTS_FILE], None
    expected = (structure or {}).get("weights_sha256")  # absent in checkpoints saved before it was recorded
    for name in files:
        f = path / name
        require(f.exists(), f"{path} is incomplete: {name} (listed in {INDEX_FILE}) is missing")
        check_safetensors(f)
        want = expected.get(name) if isinstance(expected, dict) else expected
        if want is not None and file_sha256(f) != want:
            raise FangError(f"{f} is corrupt: its sha256 checksum differs from the one in {STRUCTURE_FILE} "
                            "(re-create it with `fang prune`)")
    if weight_map is None:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as fh:
            return dict.fromkeys(fh.keys(), path / WEIGHTS_FILE)
    return {k: path / v for k, v in weight_map.items()}


def read_structure(path: str | os.PathLike) -> dict:
    path = Path(path)
    require(path.is_dir(), f"no pruned model at {path}: directory does not exist")
    structure_path = path / STRUCTURE_FILE
    require(structure_path.exists(), f"{path} is not a pruned model: {STRUCTURE_FILE} is missing")
    try:
        with open(structure_path) as fh:
            structure = json.load(fh)
    except json.JSONDecodeError as exc:
        raise FangError(f"{structure_path} is not valid JSON: {exc}") from None
    require(
        isinstance(structure, dict) and structure.get("format") == STRUCTURE_FORMAT,
        f"{structure_path}: unsupported format {structure.get('format') if isinstance(structure, dict) else None!r} "
        f"(expected {STRUCTURE_FORMAT})",
    )
    require(isinstance(structure.get("layers"), list), f"{structure_path}: 'layers' must be a list")
    return structure


def _pruned_skeleton(path: Path, structure: dict) -> nn.Module:
    """The pruned model of `path` with every parameter on meta, reshaped by its structure.json."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    require((path / "config.json").exists(), f"{path} is incomplete: config.json is missing")
    check_supported(read_config(path))
    config = AutoConfig.from_pretrained(path)
    check_supported(config)
    # Parameters on meta (no memory, no random init); buffers stay real because the rotary
    # inv_freq buffers are non-persistent: computed in __init__ and absent from the state dict.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    layers = decoder_layers(model)
    require(
        len(layers) == len(structure["layers"]),
        f"{path / STRUCTURE_FILE} describes {len(structure['layers'])} layers but the config has {len(layers)}",
    )
    for i, (layer, spec) in enumerate(zip(layers, structure["layers"])):
        apply_structure(layer, spec, i)
    return model


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(path)
    return None


def load_pruned(path: str | os.PathLike):
    """Load a directory written by `save_pruned` (one file or shards) -> (model on CPU in eval mode, tokenizer or None)."""
    from safetensors.torch import load_file

    path = Path(path)
    structure = read_structure(path)
    if not (path / INDEX_FILE).exists():
        require((path / WEIGHTS_FILE).exists(), f"{path} is incomplete: {WEIGHTS_FILE} is missing")
    model = _pruned_skeleton(path, structure)
    files = sorted(set(weight_files(path, structure).values()))
    tied = structure.get("tied", {})
    state: dict[str, Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f), device="cpu"))
        except Exception as exc:  # SafetensorError derives from Exception only
            raise FangError(f"could not read {f}: {str(exc).strip()[:300]}") from None
    where = files[0] if len(files) == 1 else path / INDEX_FILE
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # torch reports shape mismatches this way
        raise FangError(f"{where} does not match {STRUCTURE_FILE}: {str(exc).strip()[:500]}") from None
    missing = sorted(set(missing) - set(tied))
    if missing or unexpected:
        raise FangError(
            f"{where} does not match {STRUCTURE_FILE}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for alias, source in tied.items():
        module_name, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(module_name), attr, model.get_parameter(source))
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    require(not still_meta, f"{path}: weights never loaded for {still_meta[:5]}")
    model.eval()
    return model, _tokenizer(path)


def load_pruned_streamed(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: str = "float32"):
    """A pruned checkpoint with its blocks streamed from its safetensors file(s) (model.offload=disk): only the
    embeddings, final norm and head are loaded; each block is read, in its pruned shapes, when it runs.
    The same weights and buffers as `load_any(path, device, dtype)`."""
    path = Path(path)
    structure = read_structure(path)
    model = _pruned_skeleton(path, structure)
    weight_files(path, structure)  # complete and checksummed before anything is read
    # load_pruned builds the model in float32 and casts it (buffers included, e.g. the rotary inv_freq)
    # to `dtype`: the same here for everything outside the blocks (which hold no buffers)
    layers = model.model.layers
    model.model.layers = nn.ModuleList()
    try:
        model.to(dtype=DTYPE_BY_NAME[dtype])
    finally:
        model.model.layers = layers
    model = stream_from_disk(model, path, device, DTYPE_BY_NAME[dtype], tied=structure.get("tied", {}))
    return model, _tokenizer(path)


def load_any(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: str = "float32",
             offload: str = "none"):
    """Load either a dense checkpoint or a pruned one (detected by its structure file), cast to `dtype`.

    `offload` (model.offload) streams the decoder blocks (fang.model.offload; run forwards inside
    `streamed_forward`), from host RAM ("host") or from the checkpoint's safetensors file(s) ("disk"),
    dense or pruned (a pruned block is read in its own shapes)."""
    require(Path(path).is_dir(), f"model {path} is not a model folder (config.json, model.safetensors, tokenizer): "
                                 "give the folder, e.g. artifacts/pruned")
    if (Path(path) / STRUCTURE_FILE).exists():
        if offload == "disk":
            return load_pruned_streamed(path, device, dtype)
        model, tokenizer = load_pruned(path)
        if offload != "none":
            return stream_from_host(model.to(dtype=DTYPE_BY_NAME[dtype]), device), tokenizer
        return model.to(device=device, dtype=DTYPE_BY_NAME[dtype]).eval(), tokenizer
    return load_dense_offloaded(path, device, dtype, offload)
