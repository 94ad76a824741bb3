"""Sharing results through a DVC remote, and the sweep as queued DVC experiments, on a tiny git project."""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers_project import copy_project, dvc

MAIN_OUTPUTS = ("artifacts/pruned/model.safetensors", "artifacts/metrics/pruned.json", "artifacts/metrics/summary.json",
                "artifacts/summary.md", "artifacts/cluster.zarr")


def git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


pytestmark = pytest.mark.slow  # a tiny git + DVC project: push, clone, pull, and a queue of two experiments


@pytest.fixture(scope="module")
def repo(main_job, tmp_path_factory) -> Path:
    """A git + DVC project that has run the main pipeline once and committed dvc.lock: a copy of the session's
    tiny project (conftest `main_job`, built without git) put under git."""
    root = copy_project(main_job[0], tmp_path_factory.mktemp("shared") / "repo")
    (root / ".gitignore").write_text("/artifacts/*\n__pycache__/\n")  # as the real project: outputs live in DVC
    (root / ".dvc/.gitignore").write_text("/config.local\n/tmp\n/cache\n")  # what `dvc init` writes under git
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "test")
    dvc(root, "config", "--unset", "core.no_scm")  # built with `dvc init --no-scm`; now under git
    dvc(root, "config", "core.analytics", "false")
    assert "Running stage" not in dvc(root, "repro")  # the copy is up to date: the main job ran once, in main_job
    git(root, "add", "-A")
    git(root, "commit", "-qm", "tiny project, main pipeline run")
    return root


def test_remote_round_trip_fresh_clone_is_clean(repo, tmp_path):
    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "-d", "shared", str(remote))
    git(repo, "commit", "-qam", "a local-directory DVC remote")
    # the main job's outputs: the studies (studies/*/dvc.yaml) have not run, so they have none yet
    assert "pushed" in dvc(repo, "push", "dvc.yaml")
    assert any(remote.rglob("*")), "nothing reached the remote"

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    assert not (clone / "artifacts/pruned").exists()  # git carries the code and dvc.lock, not the artifacts
    dvc(clone, "pull", "dvc.yaml")
    for path in MAIN_OUTPUTS:
        assert (clone / path).exists(), path
    assert (clone / "artifacts/metrics/summary.json").read_text() == (repo / "artifacts/metrics/summary.json").read_text()
    assert "up to date" in dvc(clone, "status", "dvc.yaml")
    assert "Running stage" not in dvc(clone, "repro")  # nothing reruns: every result came from the remote


def _exp_rows(root: Path) -> list[dict]:
    # one row per experiment with params and metrics as columns (the team's results table); metric
    # names shared by several files are prefixed with the file, e.g. artifacts/metrics/pruned.json:ppl
    return list(csv.DictReader(io.StringIO(dvc(root, "exp", "show", "--only-changed", "--csv", "--no-pager"))))


def test_sweep_as_queued_experiments(repo):
    cells = [("flap", 0.2), ("o_fang", 0.2)]
    for method, sparsity in cells:
        dvc(repo, "exp", "run", "--queue", "-S", f"prune.method={method}", "-S", f"prune.sparsity={sparsity}")
    dvc(repo, "queue", "start", "-j", "1")
    deadline = time.time() + 900
    while time.time() < deadline:
        status = dvc(repo, "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(5)
    assert "Failed" not in status, status

    rows = [r for r in _exp_rows(repo) if r.get("typ") != "baseline"]
    ran = {(r["prune.method"], float(r["prune.sparsity"])) for r in rows}
    assert ran == set(cells)
    for r in rows:
        # metrics of each experiment, read from the DVC cache (cached metrics: artifacts/ is git-ignored)
        assert float(r["artifacts/metrics/prune.json:achieved_sparsity"]) == pytest.approx(0.2, abs=0.1)
        assert r["artifacts/metrics/prune.json:method"] == r["prune.method"]
        assert float(r["artifacts/metrics/pruned.json:ppl"]) > 1
    for name in (line.split()[1] for line in status.splitlines()[1:] if "Success" in line):
        log = dvc(repo, "queue", "logs", name)
        ran_stages = set(re.findall(r"Running stage '([^']+)'", log))
        # each experiment reuses the committed analysis: only pruning and what follows it rerun
        assert ran_stages == {"prune", "evaluate@pruned", "summary"}, log[-2000:]
    shutil.rmtree(repo / ".dvc/tmp/exps", ignore_errors=True)
