"""params.yaml validation: bad values fail with a message naming the key."""

import pytest

from fang.core.errors import FangError
from fang.core.params import PruneParams, load_block, parse_block


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range(value):
    with pytest.raises(FangError, match=r"prune.sparsity=.* out of range"):
        parse_block("prune", {"sparsity": value}, PruneParams)


def test_valid_sparsity_including_zero():
    assert parse_block("prune", {"sparsity": 0.0}, PruneParams).sparsity == 0.0
    assert parse_block("prune", {"sparsity": 0.4}, PruneParams).sparsity == 0.4


def test_unknown_key_and_wrong_type_are_named():
    with pytest.raises(FangError, match="unknown key.*sparsty"):
        parse_block("prune", {"sparsty": 0.3}, PruneParams)
    with pytest.raises(FangError, match="prune.sparsity='high' has the wrong type"):
        parse_block("prune", {"sparsity": "high"}, PruneParams)


def test_missing_params_file(tmp_path):
    with pytest.raises(FangError, match="params file not found"):
        load_block("prune", path=tmp_path / "params.yaml")


def test_repo_params_yaml_is_valid():
    from fang.core.params import BLOCKS, read_params

    raw = read_params("params.yaml")
    for name, cls in BLOCKS.items():
        if name in raw:
            parse_block(name, raw[name], cls)


def test_evaluation_dtype_is_checked():
    from fang.core.params import EvaluateParams

    assert parse_block("evaluate", {"dtype": "float32"}, EvaluateParams).dtype == "float32"
    with pytest.raises(FangError, match="evaluate.dtype='int8' is not one of"):
        parse_block("evaluate", {"dtype": "int8"}, EvaluateParams)


def test_every_param_a_dvc_stage_lists_is_in_params_yaml():
    # DVC refuses to commit or run a stage whose params key is missing from params.yaml; the
    # dataclass defaults would hide that from every other test
    from pathlib import Path

    import yaml

    from fang.core.params import read_params

    root = Path(__file__).resolve().parents[1]
    raw = read_params(root / "params.yaml")
    missing = []
    for dvc_file in [root / "dvc.yaml", *sorted((root / "studies").glob("*/dvc.yaml"))]:
        for name, stage in yaml.safe_load(dvc_file.read_text())["stages"].items():
            for key in stage.get("do", stage).get("params", []):
                if isinstance(key, dict):  # {other_file: [keys]}
                    continue
                node = raw
                for part in str(key).split("."):
                    if not isinstance(node, dict) or part not in node:
                        missing.append(f"{dvc_file.relative_to(root)}:{name}: {key}")
                        break
                    node = node[part]
    assert not missing, missing
