"""What each pruning method reads, so that a sweep cell reruns only when one of its own inputs changes.

DVC decides staleness from the params and deps a stage lists, and a matrix stage (method x sparsity)
lists the same ones for every cell: were every `prune.*` key listed, changing `prune.tau` (read by
FANG only) would make the obc and flap cells stale too. So each method gets a small manifest,
`method_inputs(...)`: the values of the prune keys it reads and the content hashes of the analysis
artifacts it reads. A study's cells depend on their method's manifest instead of on the keys; the
manifest is cheap to rewrite and, when nothing the method reads changed, comes out byte-identical,
so DVC does not rerun the cells behind it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from ..core.choices import parse_recipe, resolve_allocation
from ..core.errors import require
from ..core.params import PruneParams
from ..core.paths import CalibrationArtifacts
from ..core.registry import EVERY_METHOD, REGISTRY, method_spec

# The prune keys each method reads, from its registry line (e.g. magnitude runs no forward pass, so no
# batch_size; only the OBC family uses the Hessian dampening; FANG adds its own knobs to its base's).
# EVERY_METHOD: the keys all of them read (prune.align).
READS: dict[str, tuple[str, ...]] = {name: spec.reads + EVERY_METHOD for name, spec in REGISTRY.items()}
# Keys added after sweep cells were locked, with the value that reproduces what those cells ran: at that
# value a key is left out of the manifest, so adding it left every locked manifest byte-identical (no cell
# stale for a setting that changes nothing); any other value is recorded and reruns the method's cells.
SILENT_DEFAULTS = {"align": 1}
# Keys every cell passes on its command line instead of reading them from params.yaml.
CELL_KEYS = ("method", "sparsity")
# Keys a variant ("obc+fc", "o_fang+layer") may fix itself; the manifest records their effective values.
VARIANT_KEYS = ("allocation", "compensation")


def keys_read(method: str) -> tuple[str, ...]:
    """The prune keys `method` reads, plus any key not classified in READS (assumed read by every
    method: a key added later then reruns too much rather than too little)."""
    require(method in READS, f"unknown prune method {method!r}; known: {', '.join(READS)}")
    every = [f.name for f in dataclasses.fields(PruneParams) if f.name not in CELL_KEYS + VARIANT_KEYS]
    classified = {k for keys in READS.values() for k in keys}
    return tuple(k for k in every if k in READS[method] or k not in classified)


def artifacts_read(method: str, art: CalibrationArtifacts, allocation: str = "auto") -> tuple[Path, ...]:
    """Analysis artifacts `method` reads beyond the model and the capture (which every cell lists as
    deps): those of its registry line (FANG: clustering, centre distances (taylor), groups and
    allocation), plus the allocation scores when its (resolved) allocation is fc or taylor."""
    require(method in READS, f"unknown prune method {method!r}; known: {', '.join(READS)}")
    names = list(method_spec(method).artifacts)
    if resolve_allocation(method, allocation) in ("fc", "taylor") and "allocate" not in names:
        names.append("allocate")
    return tuple(getattr(art, name) for name in names)


def content_hash(path: str | os.PathLike) -> str:
    """sha256 over a file, or over a directory's files (relative paths and contents, in sorted order)."""
    path = Path(path)
    require(path.exists(), f"{path} does not exist: run the stage that writes it first")
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        digest.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def method_inputs(spec: str, params: PruneParams, art: CalibrationArtifacts, blocks: dict | None = None) -> dict:
    """The manifest of one sweep row (a method, a variant such as "obc+fc", or a recipe such as
    "o_fang+layer,tau=3"): the prune keys it reads
    with their values, its effective allocation and compensation, the keys of other params blocks
    its registry line names (values from `blocks`, the params.yaml blocks, or the defaults), and its
    artifacts' hashes."""
    recipe = parse_recipe(spec, params.allocation, params.compensation)
    v, params = recipe.variant, recipe.apply(params)  # a recipe's own settings are the values its cell reads
    read = {f"prune.{k}": getattr(params, k) for k in keys_read(v.method)
            if k not in SILENT_DEFAULTS or getattr(params, k) != SILENT_DEFAULTS[k]}
    read["allocation"] = resolve_allocation(v.method, v.allocation)
    if method_spec(v.method).compensations:  # a method with a choice of refit (o_fang)
        read["compensation"] = v.compensation
    for key in method_spec(v.method).params:
        read[key] = other_param(key, blocks or {})
    return {
        "method": spec,
        "params": read,
        "artifacts": {str(p): content_hash(p) for p in artifacts_read(v.method, art, v.allocation)},
    }


def other_param(key: str, blocks: dict):
    """The value of "block.key" in the params.yaml `blocks`, validated as that block's stage would."""
    from ..core.params import BLOCKS, parse_block

    block, _, name = key.partition(".")
    return getattr(parse_block(block, blocks.get(block), BLOCKS[block]), name)
