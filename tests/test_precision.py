"""fang compare-precision: one model evaluated in two dtypes, compared paired."""

import json

import pytest

from fang.core.errors import FangError
from fang.evaluation.precision import markdown, precision_agreement, same_answers


def _metrics(dtype: str, preds: list[int], answers: list[int], nll: list[float], model: str = "m") -> dict:
    correct = [float(p == a) for p, a in zip(preds, answers)]
    per = {"doc_id": list(range(len(preds))), "acc": correct, "pred": preds}
    return {
        "model": model, "dtype": dtype, "ppl": 10.0,
        "ppl_windows": {"nll": {"Arts": nll}, "tokens_per_window": 100},
        "tasks": {"bb_x": {"acc": sum(correct) / len(correct), "acc_stderr": 0.05, "acc_norm": None, "per_example": per}},
        "seconds": {"perplexity": 1.0, "zero_shot": 2.0},
    }


def test_counts_changed_answers_and_reads_no_difference_when_one_answer_moves():
    answers = [0, 1, 2, 3] * 25
    ref_preds = list(answers)
    ref_preds[:40] = [(a + 1) % 4 for a in answers[:40]]  # 60% right
    cand_preds = list(ref_preds)
    cand_preds[50] = (cand_preds[50] + 1) % 4  # one question changes its answer (right -> wrong)
    ref = _metrics("float32", ref_preds, answers, [300.0, 310.0, 290.0])
    cand = _metrics("bfloat16", cand_preds, answers, [300.3, 309.9, 290.0])
    assert same_answers(ref, cand) == {"bb_x": (99, 100)}
    result = precision_agreement(ref, cand)
    assert result["same_answers"]["alike"] == 99 and result["same_answers"]["questions"] == 100
    assert result["window_nll_max_rel_diff"] == pytest.approx(0.001)
    avg = result["paired"]["accuracy"]["average_all"]
    assert avg["estimate"] == pytest.approx(-0.01)
    assert avg["verdict"] == "no detectable difference"
    text = markdown([result])
    assert "99/100" in text and "bfloat16 − float32" in text
    json.dumps(result)  # written as JSON by the stage


def test_refuses_two_different_models():
    a = _metrics("float32", [0, 1], [0, 1], [1.0])
    b = _metrics("bfloat16", [0, 1], [0, 1], [1.0], model="other")
    with pytest.raises(FangError, match="one model evaluated twice"):
        precision_agreement(a, b)


def test_stage_writes_one_row_per_pair_and_refuses_an_odd_file_count(tmp_path):
    from stages.compare_precision import run

    answers = [0, 1] * 10
    files = []
    for model in ("dense", "pruned"):
        for dtype in ("float32", "bfloat16"):
            path = tmp_path / f"{model}.{dtype}.json"
            path.write_text(json.dumps(_metrics(dtype, answers, answers, [100.0, 120.0], model=model)))
            files.append(str(path))
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- precision:start -->\nold\n<!-- precision:end -->\ny\n")
    run(files, str(tmp_path / "out" / "comparison.json"), str(readme))
    written = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [c["model"] for c in written["comparisons"]] == ["dense", "pruned"]
    text = readme.read_text()
    assert "`dense`" in text and "`pruned`" in text and "old" not in text and "20/20 (100.00%)" in text
    with pytest.raises(FangError, match="pairs of metrics files"):
        run(files[:3], str(tmp_path / "x.json"))
