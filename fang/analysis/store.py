"""Zarr artifacts: written atomically, opened with a clear error when missing, stale or damaged.

Zarr reads a missing chunk back as the fill value (zeros), so a deleted chunk file would silently
turn a layer's features into zeros. Every store therefore records, when it is written, the size of
each chunk file (attrs["fang_chunks"]), and opening it checks that those files are all there at
those sizes. Chunks are compressed with a zstd checksum, so bytes flipped inside a chunk fail at
read time; any failed read is reported with the array, the layer and the store to rebuild.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..core.atomic import atomic_dir
from ..core.errors import FangError

CHUNKS_ATTR = "fang_chunks"  # {array: {chunk key: bytes}} of every chunk file present when written


def compressors():
    return zarr.codecs.ZstdCodec(level=0, checksum=True)


def chunk_manifest(store_dir: str | os.PathLike) -> dict[str, dict[str, int]]:
    """The chunk files of every array directly under a store directory, with their sizes."""
    root = Path(store_dir)
    manifest = {}
    for array_dir in sorted(p for p in root.iterdir() if (p / "zarr.json").is_file()):
        files = sorted(f for f in array_dir.rglob("*") if f.is_file() and f.name != "zarr.json")
        manifest[array_dir.name] = {f.relative_to(array_dir).as_posix(): f.stat().st_size for f in files}
    return manifest


def seal(group: zarr.Group, store_dir: str | os.PathLike) -> None:
    """Record the chunk manifest of a store whose arrays are all written (call last, before the rename)."""
    group.attrs[CHUNKS_ATTR] = chunk_manifest(store_dir)


def _where(name: str, key: str, layered: bool) -> str:
    parts = key.split("/")
    if layered and len(parts) > 1 and parts[1].isdigit():
        return f"array {name}, layer {parts[1]} (chunk {key})"
    return f"array {name} (chunk {key})"


def verify_chunks(group: zarr.Group, path: Path, stage: str) -> None:
    """FangError naming array and layer when a chunk recorded at write time is gone or has another size."""
    manifest = group.attrs.get(CHUNKS_ATTR)
    if manifest is None:  # written before manifests were recorded: nothing to compare with
        return
    for name, chunks in manifest.items():
        layered = _layered(group, name)
        for key, size in chunks.items():
            f = path / name / key
            try:
                actual = f.stat().st_size
            except FileNotFoundError:
                raise FangError(f"{path} is incomplete: {_where(name, key, layered)} is missing; "
                                f"rerun `dvc repro {stage}`") from None
            if actual != size:
                raise FangError(f"{path} is damaged: {_where(name, key, layered)} has {actual} bytes, {size} were "
                                f"written; rerun `dvc repro {stage}`")


def _layered(group: zarr.Group, name: str) -> bool:
    try:
        arr = group[name]
    except KeyError:
        raise FangError(f"{group.store} lacks array {name}: rerun the stage that writes it") from None
    # fang's layer-major arrays are chunked one layer per chunk along axis 0
    return arr.ndim > 1 and arr.chunks[0] == 1


class CheckedArray:
    """A read-only zarr array whose failed reads (corrupt chunk) raise FangError naming array and layer."""

    def __init__(self, array: zarr.Array, name: str, path: Path, stage: str):
        self._array, self._name, self._path, self._stage = array, name, path, stage

    def __getitem__(self, selection) -> Any:
        try:
            return self._array[selection]
        except FangError:
            raise
        except Exception as exc:
            first = selection[0] if isinstance(selection, tuple) and selection else selection
            where = f", layer {first}" if isinstance(first, (int, np.integer)) and self._array.ndim > 1 else ""
            raise FangError(f"{self._path} is damaged: cannot read array {self._name}{where} "
                            f"({type(exc).__name__}: {str(exc)[:120]}); rerun `dvc repro {self._stage}`") from None

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._array, attr)

    def __len__(self) -> int:
        return len(self._array)

    def __array__(self, dtype=None, copy=None):
        data = self[...]
        return data if dtype is None else data.astype(dtype)


class CheckedGroup:
    """A read-only zarr group handing out CheckedArray members; everything else is the group's."""

    def __init__(self, group: zarr.Group, path: Path, stage: str):
        self._group, self._path, self._stage = group, path, stage

    def __getitem__(self, name: str) -> CheckedArray:
        try:
            member = self._group[name]
        except KeyError:
            raise FangError(f"{self._path} has no array {name!r}: rerun `dvc repro {self._stage}`") from None
        return CheckedArray(member, name, self._path, self._stage) if isinstance(member, zarr.Array) else member

    def __contains__(self, name: str) -> bool:
        return name in self._group

    def __iter__(self):
        return iter(self._group)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._group, attr)


def open_checked(path: str | os.PathLike, kind: str, stage: str) -> CheckedGroup:
    """Open a store read-only after checking its metadata parses and every recorded chunk is present."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise FangError(f"{kind} store not found: {path} (run `dvc repro {stage}` first)")
    try:
        group = zarr.open_group(str(path), mode="r")
        dict(group.attrs)
    except (json.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
        raise FangError(f"{path} is damaged: its zarr.json metadata cannot be read ({type(exc).__name__}); "
                        f"rerun `dvc repro {stage}`") from None
    verify_chunks(group, path, stage)
    return CheckedGroup(group, path, stage)


def write_store(path: str | os.PathLike, kind: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Write arrays (chunked one layer per chunk along axis 0) and attrs; appears only when complete."""
    with atomic_dir(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        root.attrs.update(kind=kind, **attrs)
        for name, value in arrays.items():
            value = np.ascontiguousarray(value)
            chunks = (1, *value.shape[1:]) if value.ndim > 1 else value.shape
            root.create_array(name, data=value, chunks=chunks, compressors=compressors())
        seal(root, tmp)


def open_store(path: str | os.PathLike, kind: str, stage: str):
    group = open_checked(path, kind, stage)
    if group.attrs.get("kind") != kind:
        raise FangError(f"{path} is not a {kind} store; rerun `dvc repro {stage}`")
    return group
