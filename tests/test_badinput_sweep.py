"""The bad-input sweep (fang/tools/badinput_sweep.py) through the real CLI: every case must fail clearly.

Each case also proves nothing outside the command's own outputs changed (the project tree is hashed
before and after). Cases run in children forked from one process that imported fang once.
"""

from __future__ import annotations

import json

import pytest

from fang.tools import badinput_sweep

pytestmark = pytest.mark.slow


def test_every_bad_input_fails_with_one_clear_line_and_leaves_nothing(tmp_path):
    assert len(badinput_sweep.cases()) >= 90
    report = tmp_path / "sweep.json"
    badinput_sweep.main(["--work", str(tmp_path / "work"), "--json", str(report)])
    result = json.loads(report.read_text())
    bad = [(r["name"], r["verdict"], r["stderr_tail"][-300:], r["leftovers"]) for r in result["results"]
           if r["verdict"] not in ("clear", "handled")]
    assert not bad, bad
    summary = result["summary"]
    assert summary["clear"] + summary["handled"] == summary["cases"] >= 90
