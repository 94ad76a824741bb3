"""The output-path guard (fang.core.outputs): what it refuses, what it lets through, and its lock."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from fang.core import outputs
from fang.core.errors import FangError
from fang.core.outputs import guard_output, release_locks, stage_outputs, take_lock


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "artifacts" / "model").mkdir(parents=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"sweep": {"methods": ["flap", "obc+fc"], "sparsities": [0.3]}}))
    (tmp_path / "studies" / "sweep").mkdir(parents=True)
    (tmp_path / "studies" / "sweep" / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "sweep_prune": {"matrix": {"method": "${sweep.methods}", "sparsity": "${sweep.sparsities}"}, "wdir": "../..",
                        "cmd": "fang prune --out artifacts/sweep/${item.method}-${item.sparsity}",
                        "outs": ["artifacts/sweep/${item.method}-${item.sparsity}"]},
        "inputs": {"foreach": "${sweep.methods}", "do": {"wdir": "../..",
            "cmd": "fang method-inputs --method ${item} --out artifacts/inputs/${item}.json",
            "outs": [{"artifacts/inputs/${item}.json": {"cache": False}}]}},
    }}))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": {  # foreach over a mapping: ${key}
        "foreach": {"dense": {"model": "artifacts/model"}}, "do": {
            "cmd": "fang evaluate --model ${item.model} --out artifacts/metrics/${key}.json",
            "metrics": [{"artifacts/metrics/${key}.json": {"cache": True}}]}}}}))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    release_locks()


def test_stage_outputs_expand_foreach_and_matrix(project):
    found = {(str(p.relative_to(project)), stage, cmd) for p, stage, cmd in stage_outputs(project)}
    assert ("artifacts/sweep/obc+fc-0.3", "sweep_prune", "prune") in found
    assert ("artifacts/inputs/flap.json", "inputs", "method-inputs") in found
    assert ("artifacts/metrics/dense.json", "evaluate", "evaluate") in found  # metrics are outputs too
    assert ("artifacts/capture.zarr", "", "capture") in found  # the main pipeline, known without a dvc.yaml


@pytest.mark.parametrize("out, words", [
    (".", "project folder"), ("..", "project folder"), ("artifacts", "artifacts folder"),
    ("artifacts/model", "overlaps"), ("artifacts/sweep", "sweep_prune"), ("artifacts/capture.zarr/x", "inside"),
    ("artifacts/inputs/flap.json", "method-inputs"), ("", "empty"), ("params.yaml", "existing file"),
])
def test_refused_before_any_work(project, out, words):
    before = sorted(str(p) for p in project.rglob("*"))
    with pytest.raises(FangError, match=words):
        guard_output(out, "pruned_model", "--out", ["artifacts/model"])
    assert sorted(str(p) for p in project.rglob("*")) == before


def test_own_outputs_are_replaced_foreign_ones_are_not(project):
    guard_output("artifacts/sweep/flap-0.3", "pruned_model", "--out")  # a stage's own output: a rerun
    done = project / "artifacts" / "p"
    done.mkdir()
    (done / "config.json").write_text("{}")
    (done / "structure.json").write_text("{}")
    guard_output("artifacts/p", "pruned_model", "--out")
    (project / "mine").mkdir()
    (project / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(FangError, match="not a pruned model"):
        guard_output("mine", "pruned_model", "--out")
    (project / "m.json").write_text(json.dumps({"model": "x", "ppl": 1.0, "tasks": {}}))
    guard_output("m.json", "metrics", "--out")
    with pytest.raises(FangError, match="existing folder"):
        guard_output("mine", "metrics", "--out")


def test_lock_refuses_a_live_writer_and_takes_over_a_dead_ones(project):
    target = project / "artifacts" / "x"
    lock = project / "artifacts" / "x.lock"
    lock.write_text("1\n")  # init: alive
    with pytest.raises(FangError, match="pid 1"):
        take_lock(target)
    proc = subprocess.Popen(["true"])
    proc.wait()
    lock.write_text(f"{proc.pid}\n")  # gone: stale
    assert take_lock(target) == lock
    assert lock.read_text().strip() == str(os.getpid())
    release_locks()
    assert not lock.exists()


def test_unwritable_place_is_refused_first(project):
    with pytest.raises(FangError, match="cannot write"):
        guard_output("/proc/fang-x", "gguf", "--gguf")
    assert outputs.KINDS["gguf"].folder is False
