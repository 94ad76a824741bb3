"""Copy a dense Hugging Face safetensors checkpoint tensor by tensor (fetch_model with `model.offload: disk`).

`from_pretrained` + `save_pretrained` holds the whole model in host RAM; for a 70B model that is 140 GiB in
half precision before the first block is pruned. `stream_copy_checkpoint` reads one tensor at a time from the
source's safetensors files (their headers give every name, shape and dtype without reading data), casts
floating tensors to the target dtype and writes them in Hugging Face's sharded layout
(`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`), one shard per decoder block, so
peak host RAM is one block (or the embeddings).
The stages that read the model then stream it block by block (`fang.model.offload`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..core.errors import require

INDEX_FILE = "model.safetensors.index.json"


def _source_files(source: Path) -> list[Path]:
    index = source / INDEX_FILE
    if index.is_file():  # the files the index names, in the order it first names them
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [source / n for n in names]
    files = sorted(source.glob("*.safetensors"))
    require(bool(files), f"{source} holds no *.safetensors file: streaming needs a safetensors checkpoint")
    return files


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def plan_shards(source: Path) -> list[list[tuple[Path, str]]]:
    """(file, tensor name) per output shard: one shard per decoder block, in block order, and a last one with
    everything else (embeddings, final norm, head), as `save_pruned` lays out a streamed model. Reads the
    headers only."""
    from safetensors import safe_open

    blocks: dict[int, list[tuple[Path, str]]] = {}
    rest: list[tuple[Path, str]] = []
    for f in _source_files(source):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                m = _LAYER.search(name)
                (blocks.setdefault(int(m.group(1)), []) if m else rest).append((f, name))
    return [blocks[i] for i in sorted(blocks)] + ([rest] if rest else [])


def stream_copy_checkpoint(source: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype) -> int:
    """Write `source`'s tensors to the folder `out`, one shard per decoder block (`plan_shards`), floating ones
    cast to `dtype`, with the index file. Returns the number of parameters written (every tensor's elements)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source, out = Path(source), Path(out)
    shards = plan_shards(source)
    total_bytes, params, weight_map = 0, 0, {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        by_file: dict[Path, list[str]] = {}
        for f, key in shard:
            by_file.setdefault(f, []).append(key)
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt") as fh:
                for key in keys:
                    t = fh.get_tensor(key)
                    tensors[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total_bytes += t.numel() * t.element_size()
            params += t.numel()
        del tensors
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
                                             indent=2, sort_keys=True) + "\n")
    return params
