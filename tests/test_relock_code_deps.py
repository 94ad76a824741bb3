"""tools/relock_code_deps.py re-records a code-only change in a lock without rerunning the stage, and touches
nothing else: a data dependency that changed still shows in `dvc status`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TOOL = Path(__file__).resolve().parents[1] / "tools" / "relock_code_deps.py"


def _run(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=root, capture_output=True, text=True, check=False,
                          env=os.environ | {"DVC_NO_ANALYTICS": "1"})


def test_a_moved_comment_is_relocked_and_a_changed_input_is_not(tmp_path):
    root = tmp_path / "project"
    (root / "stages").mkdir(parents=True)
    (root / "stages" / "copy.py").write_text("import sys\nopen(sys.argv[2], 'w').write(open(sys.argv[1]).read())\n")
    (root / "data.txt").write_text("rows\n")
    (root / "dvc.yaml").write_text(
        "stages:\n  copy:\n    cmd: python stages/copy.py data.txt out.txt\n"
        "    deps: [data.txt, stages/copy.py]\n    outs: [out.txt]\n")
    assert _run(root, "dvc", "init", "--no-scm", "-q").returncode == 0
    assert _run(root, "dvc", "repro", "-q").returncode == 0
    locked = (root / "dvc.lock").read_text()
    # nothing to do: the check passes and the lock keeps its bytes
    assert _run(root, sys.executable, str(TOOL), "--check").returncode == 0
    (root / "stages" / "copy.py").write_text("# a comment: same output\n" + (root / "stages" / "copy.py").read_text())
    check = _run(root, sys.executable, str(TOOL), "--check")
    assert check.returncode == 1 and "copy" in check.stdout
    assert (root / "dvc.lock").read_text() == locked  # --check writes nothing
    assert _run(root, sys.executable, str(TOOL)).returncode == 0
    assert "up to date" in _run(root, "dvc", "status").stdout
    (root / "data.txt").write_text("other rows\n")  # a data change is not the tool's to hide
    assert _run(root, sys.executable, str(TOOL)).returncode == 0
    assert "data.txt" in _run(root, "dvc", "status").stdout
