"""studies/diagnostics/pair.py: paired verdicts between two evaluations, including perplexity-only ones."""

import json
import subprocess
import sys
from pathlib import Path

from fang.data.paper_tasks import PAPER_TASKS

SCRIPT = Path(__file__).resolve().parents[1] / "studies" / "diagnostics" / "pair.py"


def _metrics(nll_scale: float, correct: int | None, n: int = 200) -> dict:
    """An evaluate JSON: 3 topics x 4 windows of perplexity; with `correct`, every paper task scored on n
    questions of which the first `correct` are right."""
    nll = {topic: [nll_scale * (100 + 7 * i + j) for i in range(4)] for j, topic in enumerate("ABC")}
    windows = {"nll": nll, "tokens_per_window": 50}
    total = sum(sum(v) for v in nll.values())
    out = {"model": f"m{nll_scale}", "ppl": float(2.718281828 ** (total / (12 * 50))), "ppl_windows": windows, "tasks": {}}
    if correct is not None:
        acc = [1.0] * correct + [0.0] * (n - correct)
        for t in PAPER_TASKS:
            out["tasks"][t] = {"acc": correct / n, "acc_stderr": 0.03, "n": n,
                               "per_example": {"doc_id": list(range(n)), "acc": acc}}
    return out


def test_pair_full_and_perplexity_only(tmp_path):
    files = {"a": _metrics(1.0, 100), "b": _metrics(1.05, 140), "c": _metrics(1.0, None), "d": _metrics(1.0, None)}
    for k, m in files.items():
        (tmp_path / f"{k}.json").write_text(json.dumps(m))
    out = tmp_path / "pairs.json"
    args = [str(tmp_path / f"{k}.json") for k in "abcd"]
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    full, ppl_only = json.loads(out.read_text())["pairs"]
    # b answers 40 more of 200 questions on every task and has 5% more nll per window: better and worse
    assert abs(full["avg7"]["estimate"] - 0.2) < 1e-9 and full["avg7"]["verdict"] == "better"
    assert full["ppl"]["verdict"] == "worse" and full["ppl"]["estimate"] > 0
    # identical perplexity-only runs: no Avg7 entry, and no difference in perplexity
    assert "avg7" not in ppl_only and ppl_only["ppl"]["estimate"] == 0.0
    assert ppl_only["ppl"]["verdict"] == "no detectable difference"
    assert "Avg7" not in res.stdout.splitlines()[1] and "PPL" in res.stdout.splitlines()[1]


def test_pair_needs_pairs(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_metrics(1.0, None)))
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "o.json"), str(tmp_path / "a.json")],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "in pairs" in res.stderr
