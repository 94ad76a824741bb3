"""The bad-input sweep (tests/badinput_sweep.py) through the real CLI: every case must fail clearly.

Slow (about one `fang` process per case, 50+ cases): a few minutes on two cores.
"""

from __future__ import annotations

import json

import pytest

import badinput_sweep

pytestmark = pytest.mark.slow


def test_every_bad_input_fails_with_one_clear_line_and_leaves_nothing(tmp_path):
    assert len(badinput_sweep.cases()) >= 40
    report = tmp_path / "sweep.json"
    badinput_sweep.main(["--work", str(tmp_path / "work"), "--json", str(report)])
    result = json.loads(report.read_text())
    bad = [(r["name"], r["verdict"], r["stderr_tail"][-300:], r["leftovers"]) for r in result["results"] if r["verdict"] != "clear"]
    assert not bad, bad
    assert result["summary"]["clear"] == result["summary"]["cases"] >= 40
