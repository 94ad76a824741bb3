"""Refactoring the methods must not change what they prune: every existing method and variant on one tiny
model against fingerprints recorded from the code before the methods package (tests/method_cases.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from method_cases import CASES, fingerprint, run_case

FIXTURE = Path(__file__).parent / "data" / "method_fingerprints.json"


def _close(a, b, path: str) -> list[str]:
    """Paths where a and b differ: exactly for ints, strings and structure (which units are kept); floats to
    1e-4 relative. float32 OBC solves and FLAP's bias sums come out up to 3.4e-5 apart (relative) on another
    CPU or BLAS with the same code (measured 2026-12-06: 7 of 12 cases, every kept unit identical), while a
    change of algorithm moves them by far more than that."""
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return [f"{path}: keys {list(a)} != {list(b)}"]
        return [d for k in a for d in _close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        ok = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-9)
        return [] if ok else [f"{path}: {a!r} != {b!r}"]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_method_prunes_as_before_the_refactor(case, tmp_path):
    expected = json.loads(FIXTURE.read_text())[case[0]]
    got = json.loads(json.dumps(fingerprint(*run_case(case, tmp_path))))  # the fixture's JSON types
    diffs = _close(got, expected, case[0])
    assert not diffs, "\n".join(diffs[:20])
