"""Zarr artifacts: written atomically, opened with a clear error when missing or stale."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .atomic import atomic_dir
from .errors import FangError


def write_store(path: str | os.PathLike, kind: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Write arrays (chunked one layer per chunk along axis 0) and attrs; appears only when complete."""
    with atomic_dir(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        root.attrs.update(kind=kind, **attrs)
        for name, value in arrays.items():
            value = np.ascontiguousarray(value)
            chunks = (1, *value.shape[1:]) if value.ndim > 1 else value.shape
            root.create_array(name, data=value, chunks=chunks)


def open_store(path: str | os.PathLike, kind: str, stage: str) -> zarr.Group:
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise FangError(f"{kind} store not found: {path} (run `dvc repro {stage}` first)")
    group = zarr.open_group(str(path), mode="r")
    if group.attrs.get("kind") != kind:
        raise FangError(f"{path} is not a {kind} store; rerun `dvc repro {stage}`")
    return group
