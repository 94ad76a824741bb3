"""Cheap checks that a file on disk is what was written: safetensors layout, config.json, checksums.

A truncated or overwritten safetensors file otherwise surfaces as a raw SafetensorError (or, worse,
loads): these checks read only the header and the file size, and name the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

from .errors import FangError

# the safetensors format's own cap on the JSON header (safetensors rejects larger ones)
MAX_HEADER_BYTES = 100_000_000


def check_safetensors(path: str | os.PathLike) -> dict:
    """Raise FangError naming `path` unless its header parses and the data it announces is all there; return the header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise FangError(f"{path} is truncated ({size} bytes, not even a safetensors header): re-create it")
        (n_header,) = struct.unpack("<Q", head)
        if n_header > MAX_HEADER_BYTES:
            raise FangError(f"{path} is corrupt: its safetensors header claims {n_header:,} bytes (header too large)")
        if 8 + n_header > size:
            raise FangError(f"{path} is truncated: its header needs {8 + n_header:,} bytes, the file has {size:,}")
        raw = fh.read(n_header)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise FangError(f"{path} is corrupt: its safetensors header is not valid") from None
    expected = 8 + n_header + max(ends, default=0)
    if size < expected:
        raise FangError(f"{path} is truncated: {size:,} of {expected:,} bytes (an interrupted copy or download?)")
    if size > expected:
        raise FangError(f"{path} is corrupt: {size - expected:,} bytes beyond the tensors its header lists")
    return header


def check_safetensors_dir(path: str | os.PathLike) -> dict[str, list[int]]:
    """Check every safetensors file of a checkpoint folder; return the shape of every tensor by name."""
    shapes: dict[str, list[int]] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        header = check_safetensors(f)
        shapes.update({k: list(v.get("shape", [])) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)})
    return shapes


_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def check_dense_weights(path: str | os.PathLike, config: dict, shapes: dict[str, list[int]]) -> None:
    """The dense checkpoint's config.json describes the weights its files hold (read from the headers only).

    transformers fills what a config announces but the files lack with random weights and only warns:
    a config edited to more layers or another intermediate_size would be captured and pruned as a
    random model, or end in a shape traceback deep in the load.
    """
    f = Path(path) / "config.json"
    layers = {int(m.group(1)) for k in shapes if (m := _LAYER_KEY.match(k))}
    n_layers = config.get("num_hidden_layers")
    if layers and n_layers != len(layers):
        raise FangError(f"{f} declares num_hidden_layers={n_layers}, but the weights hold {len(layers)} layers: "
                        "re-create the checkpoint (fang fetch-model)")
    hidden, n_heads = config.get("hidden_size"), config.get("num_attention_heads")
    n_kv = config.get("num_key_value_heads") or n_heads
    head_dim = config.get("head_dim") or (hidden // n_heads if isinstance(hidden, int) and n_heads else None)
    expected = {"mlp.gate_proj.weight": [config.get("intermediate_size"), hidden],
                "self_attn.q_proj.weight": [None if head_dim is None else n_heads * head_dim, hidden],
                "self_attn.k_proj.weight": [None if head_dim is None else n_kv * head_dim, hidden]}
    for i in sorted(layers):
        for name, shape in expected.items():
            got = shapes.get(f"model.layers.{i}.{name}")
            if got is not None and got != shape:
                raise FangError(f"{f} does not describe the weights: model.layers.{i}.{name} is {got}, the config "
                                f"implies {shape} (hidden_size, intermediate_size or the head counts were edited?)")


def read_config(path: str | os.PathLike) -> dict:
    """A checkpoint directory's config.json as a dict, with a one-line error when it is not JSON."""
    f = Path(path) / "config.json"
    try:
        with open(f) as fh:
            config = json.load(fh)
    except FileNotFoundError:
        raise FangError(f"no model at {path}: expected a Hugging Face checkpoint directory with config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FangError(f"{f} is not valid JSON ({exc}): re-create the checkpoint") from None
    if not isinstance(config, dict):
        raise FangError(f"{f} is not a JSON object: re-create the checkpoint")
    return config


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
