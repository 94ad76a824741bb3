"""method-inputs: the manifest of what one pruning method reads (see fang.method_inputs)."""

from pathlib import Path

from fang import paths
from fang.atomic import write_json
from fang.method_inputs import method_inputs
from fang.params import load_block


def run(params_path: str = "params.yaml", method: str = "flap", out: str = "", source: str | None = None) -> None:
    p = load_block("prune", path=params_path)
    write_json(Path(out), method_inputs(method, p, paths.calibration_artifacts(source)))
