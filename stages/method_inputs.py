"""method-inputs: the manifest of what one pruning method reads (see fang.method_inputs)."""

import dataclasses
from pathlib import Path

from fang import paths
from fang.atomic import write_json
from fang.errors import require
from fang.method_inputs import method_inputs
from fang.params import PruneParams, read_params


def run(params_path: str = "params.yaml", method: str = "flap", out: str = "", source: str | None = None) -> None:
    # The prune block's values as written, without `load_block`'s validation: that imports the pruning
    # code (torch), which would make every manifest cost seconds; `fang prune` validates them itself.
    blocks = read_params(params_path)
    raw = blocks.get("prune") or {}
    known = {f.name for f in dataclasses.fields(PruneParams)}
    unknown = sorted(set(raw) - known)
    require(not unknown, f"unknown key(s) in params block 'prune': {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    write_json(Path(out), method_inputs(method, PruneParams(**raw), paths.calibration_artifacts(source), blocks))
