"""Cheap checks that a file on disk is what was written: safetensors layout, config.json, checksums.

A truncated or overwritten safetensors file otherwise surfaces as a raw SafetensorError (or, worse,
loads): these checks read only the header and the file size, and name the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from .errors import FangError

# the safetensors format's own cap on the JSON header (safetensors rejects larger ones)
MAX_HEADER_BYTES = 100_000_000


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise FangError naming `path` unless its header parses and the data it announces is all there."""
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


def check_safetensors_dir(path: str | os.PathLike) -> None:
    for f in sorted(Path(path).glob("*.safetensors")):
        check_safetensors(f)


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
