"""method-inputs: the manifest of what one pruning method reads (see fang.methods.inputs)."""

import dataclasses
from pathlib import Path

from fang.core import paths
from fang.core.atomic import write_json
from fang.core.errors import require
from fang.core.outputs import guard_output
from fang.core.params import PruneParams, read_params
from fang.methods.inputs import method_inputs


def run(params_path: str = "params.yaml", method: str = "flap", out: str = "", source: str | None = None,
        analysis: str | None = None) -> None:
    # The prune block's values as written, without `load_block`'s validation: that imports the pruning
    # code (torch), which would make every manifest cost seconds; `fang prune` validates them itself.
    blocks = read_params(params_path)
    guard_output(out, "method_inputs", "--out")
    raw = blocks.get("prune") or {}
    known = {f.name for f in dataclasses.fields(PruneParams)}
    unknown = sorted(set(raw) - known)
    require(not unknown, f"unknown key(s) in params block 'prune': {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    write_json(Path(out), method_inputs(method, PruneParams(**raw), paths.calibration_artifacts(source, analysis), blocks))
