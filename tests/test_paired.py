"""Paired comparisons: bootstrap intervals over the same questions / windows, and the verdict words."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fang.core.errors import FangError
from fang.evaluation.paired import (
    BETTER,
    Comparison,
    NO_DIFFERENCE,
    WORSE,
    accuracy_difference,
    perplexity_differences,
    perplexity_ratio,
)
from fang.evaluation.report import Run, compare_runs, comparison_pairs, paired_comparisons


def _task(acc, ids=None):
    return {"doc_id": list(range(len(acc))) if ids is None else ids, "acc": [float(a) for a in acc]}


def test_verdict_is_read_from_the_interval():
    assert Comparison(0.02, 0.01, 0.03, 100, True).verdict == BETTER
    assert Comparison(-0.02, -0.03, -0.01, 100, True).verdict == WORSE
    assert Comparison(0.02, -0.01, 0.05, 100, True).verdict == NO_DIFFERENCE
    # perplexity: lower is better
    assert Comparison(-0.1, -0.2, -0.05, 10, False).verdict == BETTER
    assert Comparison(0.1, 0.05, 0.2, 10, False).verdict == WORSE


def test_identical_models_show_no_difference():
    rng = np.random.default_rng(0)
    a = _task(rng.integers(0, 2, 200))
    res = accuracy_difference({"t": a}, {"t": a}, {"t": "acc"})
    assert res["t"].estimate == 0 and res["t"].low == 0 and res["t"].high == 0
    assert res["average"].verdict == NO_DIFFERENCE


def test_pairing_resolves_a_difference_two_standard_errors_cannot():
    # 400 questions, A right on 50%; B right on the same ones plus 24 more (+6 points).
    # Unpaired: se of each accuracy ~2.5 points, the two error bars overlap; paired: B never loses.
    rng = np.random.default_rng(1)
    a = (rng.random(400) < 0.5).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:24]] = 1.0
    res = accuracy_difference({"t": _task(a)}, {"t": _task(b)}, {"t": "acc"})
    se = math.sqrt(0.5 * 0.5 / 400)
    assert abs(b.mean() - a.mean()) < 2.5 * se * math.sqrt(2)  # unpaired: within noise
    assert res["t"].estimate == pytest.approx(0.06)
    assert res["t"].low > 0 and res["t"].verdict == BETTER


def test_questions_are_matched_by_doc_id():
    a = _task([1, 0, 1], ids=[0, 1, 2])
    b = _task([1, 1, 0], ids=[2, 0, 1])  # same answers as A on doc 0 and 2, better on doc 1... in another order
    b = {"doc_id": [2, 1, 0], "acc": [1.0, 1.0, 1.0]}
    res = accuracy_difference({"t": a}, {"t": b}, {"t": "acc"})
    assert res["t"].estimate == pytest.approx(1 / 3) and res["t"].n == 3


def test_missing_per_question_scores_is_a_clear_error():
    with pytest.raises(FangError, match="per-question"):
        accuracy_difference({"t": {"acc": [1.0]}}, {"t": _task([1])}, {"t": "acc"})


def test_perplexity_ratio_is_exact_for_a_constant_shift():
    a = [300.0, 310.0, 290.0]
    b = [v + 10.0 for v in a]  # 10 nats more per window of 100 tokens: PPL x exp(0.1)
    c = perplexity_ratio(a, b, 100)
    assert c.estimate == pytest.approx(math.expm1(0.1))
    assert c.low == pytest.approx(c.estimate) and c.verdict == WORSE
    with pytest.raises(FangError, match="same windows"):
        perplexity_ratio(a, b[:2], 100)


def test_perplexity_differences_per_topic_and_overall():
    wa = {"nll": {"x": [100.0, 110.0], "y": [200.0, 190.0]}, "tokens_per_window": 50}
    wb = {"nll": {"x": [90.0, 100.0], "y": [200.0, 190.0]}, "tokens_per_window": 50}
    res = perplexity_differences(wa, wb)
    assert res["x"].verdict == BETTER and res["y"].estimate == 0.0
    assert res["overall"].n == 4 and res["overall"].estimate < 0


def _metrics(acc_t1, acc_ns, nll):
    return {
        "ppl": 10.0,
        "tasks": {
            "bb_t1": {"acc": float(np.mean(acc_t1)), "acc_norm": None, "per_example": _task(acc_t1)},
            "next_sentence": {"acc": 0.5, "acc_norm": float(np.mean(acc_ns))},
            "next_sentence_people": {"acc": 0.5, "acc_norm": float(np.mean(acc_ns)),
                                     "per_example": {"doc_id": list(range(len(acc_ns))),
                                                     "acc_norm": [float(v) for v in acc_ns]}},
        },
        "ppl_windows": {"nll": {"People": nll}, "tokens_per_window": 10},
    }


def test_compare_runs_splits_in_and_out_of_domain():
    a = Run("obc", 0.3, _metrics([0, 1, 0, 1] * 25, [0, 0, 1, 1] * 25, [20.0] * 8))
    b = Run("o_fang", 0.3, _metrics([1, 1, 0, 1] * 25, [0, 0, 1, 1] * 25, [21.0] * 8))
    res = compare_runs(a, b)
    assert res["accuracy"]["bb_t1"]["estimate"] == pytest.approx(0.25)
    assert res["accuracy"]["average_out_of_domain"]["verdict"] == BETTER
    assert res["accuracy"]["average_in_domain"]["estimate"] == 0.0  # pooled from next_sentence_people
    assert res["perplexity"]["overall"]["verdict"] == WORSE


def test_comparison_pairs_and_missing_runs():
    methods = ["flap", "flap+uniform", "f_fang", "obc", "obc+fc", "o_fang", "o_fang+layer", "wanda_sp"]
    pairs = comparison_pairs(methods)
    assert ("f_fang", "flap") in pairs and ("f_fang", "flap+uniform") in pairs
    assert ("o_fang+layer", "obc+fc") in pairs and ("o_fang", "obc") in pairs
    assert not any(b == "wanda_sp" for _, b in pairs) and len(pairs) == 2 + 2 * 2
    # every FANG row is also paired with every SoBP row, the seed paper's strongest baseline; sobp with obc
    pairs = comparison_pairs(["obc", "o_fang+layer", "f_fang", "sobp"])
    assert pairs == [("o_fang+layer", "obc"), ("o_fang+layer", "sobp"), ("f_fang", "sobp"), ("sobp", "obc")]
    # the seeds' methods pair with the baseline their registry line names
    assert comparison_pairs(["wanda_sp", "gprune", "flap+uniform", "ica_fn", "ica_fn_ranked+fc"]) == [
        ("gprune", "wanda_sp"), ("ica_fn", "flap+uniform"), ("ica_fn_ranked+fc", "flap+uniform")]
    runs = [Run("obc", 0.3, _metrics([0, 1] * 10, [0, 1] * 10, [5.0] * 4)),
            Run("o_fang", 0.3, _metrics([1, 1] * 10, [0, 1] * 10, [5.0] * 4))]
    out = paired_comparisons(runs, ["obc", "o_fang"], [0.3, 0.4])
    assert len(out) == 1 and out[0]["sparsity"] == 0.3  # 40% has no runs: not compared


def test_sizes_by_power_match_the_bootstrap_they_plan_for():
    import numpy as np

    from fang.evaluation.paired import (accuracy_difference, average_halfwidth, difference_variance,
                                        limit_for_halfwidth)

    rng = np.random.default_rng(3)
    per_a, per_b, var = {}, {}, {}
    for t, n in (("x", 800), ("y", 300)):
        a = (rng.random(n) < 0.6).astype(float)
        flip = rng.random(n) < 0.2  # the models disagree on a fifth of the questions
        b = np.where(flip, 1 - a, a)
        per_a[t] = {"doc_id": list(range(n)), "acc": a.tolist()}
        per_b[t] = {"doc_id": list(range(n)), "acc": b.tolist()}
        var[t] = difference_variance(per_a[t], per_b[t], "acc", t)
        assert var[t] == pytest.approx(0.2, abs=0.05)
    res = accuracy_difference(per_a, per_b, {"x": "acc", "y": "acc"})["average"]
    planned = average_halfwidth(var, {"x": 800, "y": 300})
    assert (res.high - res.low) / 2 == pytest.approx(planned, rel=0.1)  # the normal plan is the bootstrap's width
    limit = limit_for_halfwidth(var, {"x": 800, "y": 300}, planned * 1.2)
    assert limit < 800 and average_halfwidth(var, {"x": min(limit, 800), "y": min(limit, 300)}) <= planned * 1.2
    assert average_halfwidth(var, {"x": min(limit - 1, 800), "y": min(limit - 1, 300)}) > planned * 1.2
    assert limit_for_halfwidth(var, {"x": 800, "y": 300}, planned / 2) is None  # unreachable with these questions
