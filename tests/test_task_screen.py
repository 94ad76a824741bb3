"""The task screen's decisions: affordability, the probe, the full decision, constant answers, the budget."""

from __future__ import annotations

import math

import pytest

from fang.core.errors import FangError
from fang.evaluation.task_screen import (
    Candidate,
    ScreenResult,
    affordable,
    choose_dev_set,
    constant_share,
    decide_full,
    decide_probe,
    markdown,
    score,
    z_above_chance,
)


def test_z_and_constant_share():
    assert z_above_chance(0.6, 0.05, 0.5) == pytest.approx(2.0)
    assert z_above_chance(1.0, 0.0, 0.5) == math.inf and z_above_chance(0.0, 0.0, 0.5) == -math.inf
    assert constant_share([1, 1, 1, 0]) == 0.75 and constant_share(None) is None


def test_affordable_filters_small_and_expensive_tasks():
    cands = [Candidate("small", 50, 2, 0.5), Candidate("big", 1000, 5, 0.2), Candidate("ok", 300, 4, 0.25),
             Candidate("excluded", 300, 2, 0.5)]
    kept = affordable(cands, min_examples=100, max_task_requests=2000, exclude=["excluded"])
    assert [c.name for c in kept] == ["ok"]
    assert "min_examples" in cands[0].decision and "max_task_requests" in cands[1].decision
    assert "excluded" in cands[3].decision


def test_affordable_leaves_out_long_questions():
    long, short, unmeasured = Candidate("long", 300, 2, 0.5), Candidate("short", 300, 2, 0.5), Candidate("u", 300, 2, 0.5)
    long.max_tokens, short.max_tokens = 9000, 200
    kept = affordable([long, short, unmeasured], min_examples=100, max_task_requests=2000, max_request_tokens=1024)
    assert [c.name for c in kept] == ["short", "u"]
    assert "9000 tokens > screen.max_request_tokens=1024" in long.decision


def test_probe_then_full_decision():
    c = Candidate("t", 400, 2, 0.5)
    assert not decide_probe(c, {"n": 30, "acc": 0.5, "stderr": 0.09}, probe_min_z=1.0)
    assert c.decision.startswith("dropped: probe")
    c = Candidate("t", 400, 2, 0.5)
    assert decide_probe(c, {"n": 30, "acc": 0.7, "stderr": 0.08}, probe_min_z=1.0)
    # winowhy-like: 55% on 400 questions is 2 se above chance -> dropped at min_z = 3
    assert not decide_full(c, {"n": 400, "acc": 0.55, "stderr": 0.025, "constant_share": 0.6}, min_z=3.0)
    assert "2.0 se" in c.decision
    c2 = Candidate("u", 400, 2, 0.5)
    assert decide_full(c2, {"n": 400, "acc": 0.6, "stderr": 0.0245, "constant_share": 0.6}, min_z=3.0)
    assert c2.decision == "kept"


def test_a_constant_answer_is_dropped_even_above_chance():
    # always answering "A" on a task whose answers are mostly A looks accurate but separates nothing
    c = Candidate("biased", 400, 2, 0.5)
    assert not decide_full(c, {"n": 400, "acc": 0.7, "stderr": 0.023, "constant_share": 0.99}, min_z=3.0)
    assert "same answer" in c.decision


def test_dev_set_takes_strongest_tasks_within_budget():
    cands = []
    for name, n, z in (("a", 300, 8.0), ("b", 400, 5.0), ("c", 200, 4.0)):
        c = Candidate(name, n, 4, 0.25)
        c.decision, c.full, c.tokens = "kept", {"z": z}, 4 * n
        cands.append(c)
    chosen = choose_dev_set(cands, max_total_tokens=2100)  # a: 1200, b: 1600 (over), c: 800
    assert chosen == ["a", "c"] and cands[0].in_dev_set and not cands[1].in_dev_set
    assert "over the budget" in cands[1].decision
    with pytest.raises(FangError):
        choose_dev_set(cands, 0)


def test_score_uses_the_reported_metric_and_markdown_lists_decisions():
    s = score({"acc": 0.4, "acc_stderr": 0.02, "acc_norm": 0.5, "acc_norm_stderr": 0.03, "n": 100}, [0, 1, 1])
    assert s["acc"] == 0.5 and s["stderr"] == 0.03 and s["metric"] == "acc_norm"
    assert s["constant_share"] == pytest.approx(2 / 3)
    c = Candidate("good", 300, 4, 0.25)
    c.tokens = 1000
    decide_probe(c, {"n": 30, "acc": 0.6, "stderr": 0.09}, 1.0)
    decide_full(c, {"n": 300, "acc": 0.5, "stderr": 0.029, "constant_share": 0.4}, 3.0)
    r = ScreenResult("m", [c, Candidate("tiny", 10, 2, 0.5, decision="not screened: small")])
    r.dev_set = choose_dev_set(r.candidates, 5000)
    md = markdown(r.as_dict())
    assert "| good | 300 |" in md and "**dev set**" in md and "1 not screened" in md


def test_full_pass_stops_once_the_budget_is_filled():
    from fang.evaluation.task_screen import confirm_within_budget

    def cand(name, n, z):
        c = Candidate(name, n, 2, 0.5)
        c.probe = {"n": 30, "acc": 0.7, "stderr": 0.08, "z": z}
        c.tokens = 2 * n
        return c

    strong, big, weak_kept, weakest = cand("strong", 1000, 5.0), cand("big", 2000, 4.0), cand("small", 500, 3.0), cand("weakest", 400, 2.0)
    evaluated = []

    def evaluate_full(c):
        evaluated.append(c.name)
        return {"n": c.n_examples, "acc": 0.8, "stderr": 0.01, "constant_share": 0.5}

    # budget 3200 tokens: strong (2000) is kept, big (4000) no longer fits, small (1000) does; weakest would overflow
    confirm_within_budget([weakest, big, weak_kept, strong], evaluate_full, min_z=3.0, max_total_tokens=3200)
    assert evaluated == ["strong", "small"]
    assert strong.decision == weak_kept.decision == "kept"
    assert "already filled" in big.decision and "already filled" in weakest.decision
    assert sorted(choose_dev_set([strong, big, weak_kept, weakest], 3200)) == ["small", "strong"]


def test_token_costs_leave_out_expensive_tasks_and_must_be_measured():
    cheap, dear = Candidate("cheap", 300, 2, 0.5), Candidate("dear", 300, 2, 0.5)
    cheap.tokens, dear.tokens = 10_000, 200_000  # same requests, 20x the tokens (long reviews vs short questions)
    kept = affordable([cheap, dear], min_examples=100, max_task_requests=2000, max_task_tokens=60_000)
    assert kept == [cheap] and "200000 tokens per evaluation > screen.max_task_tokens=60000" in dear.decision
    unmeasured = Candidate("u", 300, 2, 0.5)
    unmeasured.decision, unmeasured.full = "kept", {"z": 5.0}
    with pytest.raises(FangError, match="not measured"):
        choose_dev_set([unmeasured], 1000)


def test_evaluation_tokens_counts_each_question_once_and_every_choice():
    from helpers_tokenizer import tiny_tokenizer  # one token per character
    from fang.evaluation.task_screen import evaluation_tokens

    total, longest = evaluation_tokens(tiny_tokenizer(), ["abcd", "ef"], [["x", "yz"], ["uvw"]])
    # choices are scored with a leading space: " x" 2, " yz" 3, " uvw" 4
    assert total == (4 + 2 + 3) + (2 + 4) and longest == 4 + 3


def _shuffled_true_false(n: int, share_false: float, seed: int = 0) -> list[dict]:
    """BIG-bench style rows: the two choices in a random order per question, gold by index."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        truth = "false" if i < share_false * n else "true"
        choices = ["true", "false"] if rng.random() < 0.5 else ["false", "true"]
        rows.append({"choices": choices, "gold": [choices.index(truth)]})
    return rows


def test_always_false_on_shuffled_choices_is_a_constant_answer_and_no_better_than_the_majority():
    # fact_checker on SmolLM2-135M: "false" on all 142 questions, balanced choice indices, 71% right
    from fang.evaluation.task_screen import answer_texts, majority_rate

    rows = _shuffled_true_false(200, 0.7)
    preds = [r["choices"].index("false") for r in rows]  # the model always says "false"
    assert 0.3 < constant_share(preds) < 0.7  # the index view sees nothing wrong
    texts = answer_texts(rows, list(range(200)), preds)
    assert constant_share(texts) == 1.0
    acc = sum(p in r["gold"] for p, r in zip(preds, rows)) / 200
    assert acc == pytest.approx(0.7) and majority_rate(rows) == pytest.approx(0.7)

    c = Candidate("fact_checker", 200, 2, 0.5, majority=majority_rate(rows))
    stderr = math.sqrt(acc * (1 - acc) / 199)
    assert not decide_full(c, {"n": 200, "acc": acc, "stderr": stderr, "constant_share": constant_share(texts)}, 3.0)
    assert "same answer on 100%" in c.decision
    # the same accuracy with varied answers is still no better than always saying "false"
    c = Candidate("fact_checker", 200, 2, 0.5, majority=majority_rate(rows))
    assert not decide_full(c, {"n": 200, "acc": acc, "stderr": stderr, "constant_share": 0.6}, 3.0)
    assert "above the majority answer 0.700" in c.decision
    # and beating the majority by 3 standard errors keeps it
    c = Candidate("fact_checker", 200, 2, 0.5, majority=majority_rate(rows))
    assert decide_full(c, {"n": 200, "acc": 0.82, "stderr": 0.027, "constant_share": 0.6}, 3.0)


def test_majority_counts_every_correct_text_and_the_floor_is_never_below_chance():
    from fang.evaluation.task_screen import majority_rate

    rows = [{"choices": ["a", "b", "c"], "gold": [2]}, {"choices": ["b", "c", "a"], "gold": [1]},
            {"choices": ["c", "a", "b"], "gold": [0, 2]}]  # c right in all three ("c" and "b" in the last)
    assert majority_rate(rows) == 1.0
    assert Candidate("x", 3, 3, 1 / 3, majority=1.0).floor == 1.0
    assert Candidate("x", 3, 3, 0.25, majority=0.1).floor == 0.25
    assert Candidate("x", 3, 3, 0.25).floor == 0.25


def test_stage_scores_constant_share_on_answer_texts_for_tasks_and_groups():
    from fang.evaluation.task_screen import task_score

    rows = _shuffled_true_false(40, 0.5, seed=1)
    preds = [r["choices"].index("false") for r in rows]
    results = {"bb_fc": {"acc": 0.5, "acc_stderr": 0.08, "acc_norm": None, "n": 40,
                         "per_example": {"doc_id": list(range(40)), "pred": preds}}}
    assert task_score(results, "bb_fc", {"bb_fc": rows})["constant_share"] == 1.0
    # a group (next_sentence) pools its subtasks' answers, each read against its own rows
    group = {"ns": {"acc": 0.5, "acc_stderr": 0.08, "acc_norm": None, "n": 40},
             "ns_a": {"per_example": {"doc_id": list(range(20)), "pred": preds[:20]}},
             "ns_b": {"per_example": {"doc_id": list(range(20)), "pred": preds[20:]}}}
    scored = task_score(group, "ns", {"ns_a": rows[:20], "ns_b": rows[20:]})
    assert scored["constant_share"] == 1.0 and scored["acc"] == 0.5


def test_judge_tasks_redecides_an_evaluation_with_the_screen_rule():
    # a sweep's dense row holds every question: the screen's decision is made again on it, so a task
    # chosen by an older rule (fact_checker: "always false") is recognised without a new model run
    from fang.evaluation.task_screen import judge_tasks

    rows = _shuffled_true_false(200, 0.7)
    always_false = [r["choices"].index("false") for r in rows]
    right = [r["gold"][0] if i % 10 else 1 - r["gold"][0] for i, r in enumerate(rows)]  # 90% right, varied
    entry = lambda preds: {"acc": sum(p in r["gold"] for p, r in zip(preds, rows)) / 200, "acc_stderr": 0.03,
                           "acc_norm": None, "n": 200, "per_example": {"doc_id": list(range(200)), "pred": preds}}
    tasks = {"bb_fc": entry(always_false), "bb_good": entry(right),
             "ns": {"acc": 0.9, "acc_stderr": 0.03, "acc_norm": None, "n": 200}, "ns_a": entry(right)}
    judged = judge_tasks(tasks, {"bb_fc": rows, "bb_good": rows, "ns_a": rows}, 3.0)
    assert set(judged) == {"bb_fc", "bb_good", "ns", "ns_a"}  # ns_a is a leaf here, not a next_sentence_ subtask
    assert judged["bb_fc"].decision == "dropped: the same answer on 100% of questions"
    assert judged["bb_fc"].floor == pytest.approx(0.7) and judged["bb_fc"].chance == pytest.approx(0.5)
    assert judged["bb_good"].decision == "kept" and judged["bb_good"].full["z"] == pytest.approx((0.9 - 0.7) / 0.03)
    assert judged["ns"].decision == "kept"  # a group is judged on its subtasks' rows and answers
    with pytest.raises(FangError, match="no rows"):
        judge_tasks({"bb_missing": entry(right)}, {}, 3.0)


def test_the_published_block_names_the_option_that_rewrites_it():
    import inspect

    from fang import cli
    from fang.evaluation.task_screen import ScreenResult, results_block

    settings = {"dtype": "float32", "min_examples": 4, "max_task_requests": 10, "max_request_tokens": 20,
                "max_task_tokens": 30, "probe_examples": 2, "probe_min_z": 1.0, "min_z": 3.0, "max_total_tokens": 40}
    block = results_block(ScreenResult("m", settings=settings).as_dict(), "2026-01-01T00:00:00")
    assert block.startswith("<!-- generated by `fang screen-tasks --results` on 2026-01-01T00:00:00 ")
    assert "results" in inspect.signature(cli.screen_tasks).parameters
