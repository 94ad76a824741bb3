"""tools/relock_code_deps.py re-records a code-only change made since a base commit in a lock, without rerunning
the stage, and touches nothing else: a data change still shows in `dvc status`, and a stage that was already stale
at the base is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TOOL = Path(__file__).resolve().parents[1] / "tools" / "relock_code_deps.py"
COPY = "import sys\nopen(sys.argv[2], 'w').write(open(sys.argv[1]).read())\n"


def _run(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(list(args), cwd=root, capture_output=True, text=True, check=False, env=env)


def _project(root: Path) -> None:
    (root / "stages").mkdir(parents=True)
    for name in ("copy", "other"):
        (root / "stages" / f"{name}.py").write_text(COPY)
        (root / f"{name}.txt").write_text("rows\n")
    # deps listed out of path order: dvc writes them sorted, and so must the tool
    (root / "dvc.yaml").write_text(
        "stages:\n"
        "  copy:\n    cmd: python stages/copy.py copy.txt out.txt\n    deps: [stages/copy.py, copy.txt]\n    outs: [out.txt]\n"
        "  other:\n    cmd: python stages/other.py other.txt out2.txt\n    deps: [stages/other.py, other.txt]\n"
        "    outs: [out2.txt]\n")
    assert _run(root, "git", "init", "-q").returncode == 0
    assert _run(root, "dvc", "init", "-q").returncode == 0
    assert _run(root, "dvc", "repro", "-q").returncode == 0


def test_a_code_only_change_since_base_is_relocked_and_nothing_else(tmp_path):
    root = tmp_path / "project"
    _project(root)
    # `other` goes stale before the base commit: its code changed after it ran and nobody reran it
    (root / "stages" / "other.py").write_text("# changed before the base\n" + COPY)
    assert _run(root, "git", "add", "-A").returncode == 0
    assert _run(root, "git", "commit", "-qm", "base").returncode == 0
    locked = (root / "dvc.lock").read_text()
    tool = [sys.executable, str(TOOL), "--base", "HEAD"]
    assert _run(root, *tool, "--check").returncode == 0  # nothing changed since the base
    assert _run(root, sys.executable, str(TOOL), "--check").returncode == 2  # no base: refused, one line
    (root / "stages" / "copy.py").write_text("# a comment: same output\n" + COPY)
    check = _run(root, *tool, "--check")
    assert check.returncode == 1 and "copy" in check.stdout
    assert (root / "dvc.lock").read_text() == locked  # --check writes nothing
    done = _run(root, *tool)
    assert done.returncode == 0 and "other: skipped (already stale" in done.stderr
    status = _run(root, "dvc", "status").stdout
    assert "copy:" not in status and "other:" in status  # the stale stage still shows
    (root / "copy.txt").write_text("other rows\n")  # a data change is not the tool's to hide
    assert _run(root, *tool).returncode == 0
    assert "copy.txt" in _run(root, "dvc", "status").stdout
