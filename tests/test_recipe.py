"""The recipe study's pieces: recipe grammar, the question split, the tuning-half search and the confirmation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fang.core.choices import parse_recipe
from fang.core.errors import FangError
from fang.core.params import PruneParams, RecipeParams
from fang.data.paper_tasks import PAPER_TASKS
from fang.evaluation.halves import evaluated_questions, restrict, split_questions
from fang.evaluation.recipe import choose, confirm, search_table, seven_task_average

N = 200  # questions per task in the synthetic evaluations


def test_recipe_names_are_canonical_and_apply_their_settings():
    r = parse_recipe("o_fang+flap_search+layer,tau=3.0")
    assert r.name == "o_fang+flap_search+layer,tau=3"
    p = r.apply(PruneParams(method="flap", tau=9.0))
    assert (p.method, p.allocation, p.compensation, p.tau) == ("o_fang", "flap_search", "layer", 3.0)
    assert parse_recipe("f_fang,shared_group=false,reweighting=uniform").name == "f_fang,reweighting=uniform,shared_group=false"
    assert parse_recipe("obc").apply(PruneParams(tau=9.0)).tau == 9.0  # no setting: the params' value
    # align is read by every method (registry EVERY_METHOD), so any recipe may set it; it stays a whole number
    r = parse_recipe("obc+fc,align=32")
    assert r.name == "obc+fc,align=32" and r.apply(PruneParams()).align == 32
    with pytest.raises(FangError, match="not a whole number"):
        parse_recipe("obc,align=3.5")
    with pytest.raises(FangError, match="prune.align=0"):
        parse_recipe("obc,align=0").apply(PruneParams()).validate()
    for spec, message in [("obc,tau=3", "obc does not read prune.tau"), ("o_fang,tau=x", "not a number"),
                          ("o_fang,tau", "not a key=value"), ("o_fang,sparsity=0.5", "cannot be set in a recipe"),
                          ("o_fang,tau=1,tau=2", "sets tau twice"), ("f_fang,shared_group=no", "true or false")]:
        with pytest.raises(FangError, match=message):
            parse_recipe(spec)


def test_recipe_params_refuse_a_non_canonical_or_doubled_candidate():
    ok = RecipeParams(candidates=["o_fang,tau=3"], sweep_candidates=["o_fang"])
    ok.validate()
    for bad, message in [(dict(candidates=["o_fang,tau=3.0"]), "write 'o_fang,tau=3.0' as 'o_fang,tau=3'"),
                         (dict(candidates=["o_fang"], sweep_candidates=["o_fang"]), "listed as a new candidate and as a sweep row"),
                         (dict(confirm_sparsities=[0.2, 0.3]), "must include every search sparsity"),
                         (dict(baselines=[]), "baselines is empty")]:
        with pytest.raises(FangError, match=message):
            dataclasses.replace(ok, **bad).validate()


def test_split_is_seeded_per_task_balanced_and_disjoint():
    ids = {"boolq": list(range(11)), "piqa": list(range(100, 140))}
    a, b = split_questions(ids, seed=0), split_questions(ids, seed=0)
    assert a == b  # reproducible across calls (and processes: the per-task seed is a sha256, not hash())
    assert split_questions(ids, seed=1) != a
    for task, all_ids in ids.items():
        t, c = a["tuning"][task], a["confirmation"][task]
        assert sorted(t + c) == all_ids and not set(t) & set(c)
        assert len(t) - len(c) in (0, 1) and t == sorted(t)
    with pytest.raises(FangError, match="cannot be split"):
        split_questions({"boolq": [3]}, 0)


def _metrics(p_correct: float, seed: int, ppl: float = 20.0, doc_offset: int = 0) -> dict:
    """A synthetic evaluate JSON: per-question 0/1 scores on the seven tasks and perplexity windows."""
    rng = np.random.default_rng(seed)
    tasks = {}
    for t in PAPER_TASKS:
        acc = (rng.random(N) < p_correct).astype(float).tolist()
        metric = "acc" if t == "boolq" else "acc_norm"
        pe = {"doc_id": list(range(doc_offset, doc_offset + N)), "acc": acc}
        if metric == "acc_norm":
            pe["acc_norm"] = acc
        tasks[t] = {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc)) if metric == "acc_norm" else None,
                    "n": N, "per_example": pe}
    nll = (np.log(ppl) * 100 + rng.normal(0, 1, 16)).tolist()
    return {"model": f"m{seed}", "ppl": ppl, "tasks": tasks, "ppl_windows": {"nll": {"Cats": nll}, "tokens_per_window": 100}}


def test_restrict_recomputes_accuracy_on_the_half_and_refuses_foreign_questions():
    m = _metrics(0.5, 0)
    half = split_questions(evaluated_questions(m), 0)["tuning"]
    cut = restrict(m, half)
    for t in PAPER_TASKS:
        pe = cut["tasks"][t]["per_example"]
        assert pe["doc_id"] == half[t] and cut["tasks"][t]["n"] == len(half[t])
        assert cut["tasks"][t]["acc"] == pytest.approx(np.mean(pe["acc"]))
    assert m["tasks"]["boolq"]["n"] == N  # the input is left alone
    with pytest.raises(FangError, match="were not evaluated"):
        restrict(m, {"boolq": [N + 5]})


def test_search_chooses_on_the_tuning_half_and_confirmation_judges_on_the_other():
    dense_ids = evaluated_questions(_metrics(0.5, 0))
    halves = split_questions(dense_ids, 0)
    # candidate "good" answers better than the baseline; "same" is the baseline's twin (same scores)
    base = {s: _metrics(0.45, 10 + i) for i, s in enumerate((0.3, 0.4))}
    good = {s: _metrics(0.75, 20 + i, ppl=25.0) for i, s in enumerate((0.3, 0.4))}
    cands = {("good", s): good[s] for s in good} | {("same", s): base[s] for s in base}
    table = search_table(cands, {("obc", s): base[s] for s in base}, halves["tuning"])
    assert len(table) == 4 and {r["recipe"] for r in table} == {"good", "same"}
    same = next(r for r in table if r["recipe"] == "same")
    assert same["vs"]["obc"]["estimate"] == 0.0 and same["vs"]["obc"]["verdict"] == "no detectable difference"
    avg, se = seven_task_average(restrict(good[0.3], halves["tuning"]))
    row = next(r for r in table if r["recipe"] == "good" and r["sparsity"] == 0.3)
    assert row["avg7"] == pytest.approx(avg) and 0 < se < 0.05
    choice = choose(table, [0.3, 0.4])
    assert choice["recipe"] == "good" and choice["ranking"] == ["good", "same"]
    result = confirm("good", good, {("obc", s): base[s] for s in base}, halves["confirmation"])
    assert [v["sparsity"] for v in result["verdicts"]] == [0.3, 0.4]
    assert all(v["avg7"]["verdict"] == "better" for v in result["verdicts"]) and result["wins_everywhere"]
    assert all(v["ppl"]["verdict"] == "worse" for v in result["verdicts"])  # ppl 25 against 20, same windows
    n_conf = sum(len(v) for v in halves["confirmation"].values())
    assert result["verdicts"][0]["avg7"]["n"] == n_conf  # judged on the confirmation questions only
    with pytest.raises(FangError, match="no candidate was scored at every search sparsity"):
        choose([r for r in table if r["sparsity"] == 0.3], [0.3, 0.4])


def test_choose_breaks_ties_by_calibration_domain_perplexity():
    rows = [{"recipe": r, "sparsity": s, "avg7": 0.4, "ppl": ppl} for r, ppl in (("a", 30.0), ("b", 25.0)) for s in (0.3, 0.4)]
    assert choose(rows, [0.3, 0.4])["recipe"] == "b"


def test_the_study_stages_split_select_and_confirm_from_the_files_they_read(tmp_path, monkeypatch):
    """recipe_split -> recipe_select -> recipe_confirm on synthetic evaluations laid out as the sweep and the study
    write them (no model: the chosen recipe is a sweep row, so confirming needs no evaluation)."""
    import json

    import yaml

    from stages import recipe_confirm, recipe_select, recipe_split

    monkeypatch.chdir(tmp_path)
    sweep, cells = tmp_path / "artifacts/sweep", tmp_path / "artifacts/recipe/cells"
    sweep.mkdir(parents=True)
    cells.mkdir(parents=True)
    (sweep / "dense.metrics.json").write_text(json.dumps(_metrics(0.6, 0)))
    for i, s in enumerate((0.3, 0.4)):
        (sweep / f"obc-{s}.metrics.json").write_text(json.dumps(_metrics(0.45, 10 + i)))
        (sweep / f"o_fang-{s}.metrics.json").write_text(json.dumps(_metrics(0.75, 20 + i)))
        # the study's own candidate, scored on the tuning half only (what `fang evaluate --half tuning` writes)
        (cells / f"o_fang,tau=3-{s}.tuning.json").write_text(json.dumps(_metrics(0.5, 30 + i)))
    params = {"recipe": {"seed": 0, "sparsities": [0.3, 0.4], "confirm_sparsities": [0.3, 0.4],
                         "candidates": ["o_fang,tau=3"], "sweep_candidates": ["o_fang"], "baselines": ["obc"]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    recipe_split.run()
    halves = json.loads((tmp_path / "artifacts/recipe/halves.json").read_text())
    # the candidate file holds every question; select must cut it to the tuning half
    tuning = halves["halves"]["tuning"]
    recipe_select.run()
    search = json.loads((tmp_path / "artifacts/recipe/search.json").read_text())
    assert search["choice"]["recipe"] == "o_fang" and len(search["table"]) == 4
    assert search["table"][0]["vs"]["obc"]["n"] == sum(len(v) for v in tuning.values())
    recipe_confirm.run()
    result = json.loads((tmp_path / "artifacts/recipe/confirmation.json").read_text())
    assert result["recipe"] == "o_fang" and result["wins_everywhere"]
    n_conf = sum(len(v) for v in halves["halves"]["confirmation"].values())
    assert [v["avg7"]["n"] for v in result["verdicts"]] == [n_conf, n_conf]
    assert json.loads((tmp_path / "artifacts/recipe/confirm/index.json").read_text()) == {"recipe": "o_fang", "evaluated": []}
    # the published study: the whole search table and every confirmation verdict, between the markers only
    from stages import recipe_report

    page, readme = tmp_path / "results.md", tmp_path / "README.md"
    page.write_text("# Results\n<!-- recipe:start -->\nold\n<!-- recipe:end -->\nkept\n")
    readme.write_text("intro\n<!-- recipe-headline:start -->\n<!-- recipe-headline:end -->\n")
    recipe_report.run(str(page), str(readme))
    text = page.read_text()
    assert text.startswith("# Results\n<!-- recipe:start -->") and text.endswith("<!-- recipe:end -->\nkept\n")
    assert "old" not in text and "| 30% | **o_fang** |" in text and "| 40% | o_fang,tau=3 |" in text
    assert text.count("| obc |") == 2 and "better" in text
    short = readme.read_text()
    assert "| 30% | +" in short and "| 40% | +" in short and "**better**" in short and "Ranking by that mean: o_fang " in short
    assert "detectably better than every baseline at 30% and 40%" in short
    # a missing sweep row is one line naming it and what to run
    (sweep / "obc-0.4.metrics.json").unlink()
    with pytest.raises(FangError, match=r"obc-0.4.metrics.json is missing: run `dvc repro studies/sweep/dvc.yaml`"):
        recipe_select.run()


def test_a_half_is_keyed_by_the_tasks_that_answer_questions_a_groups_subtasks():
    from fang.evaluation.evaluate import leaf_tasks
    from fang.evaluation.halves import lm_eval_samples

    manifest = {"tasks": [{"name": "boolq", "lm_eval_tasks": ["boolq"]},
                          {"name": "next_sentence", "lm_eval_tasks": ["next_sentence"],
                           "subtasks": {"next_sentence_people": {}, "next_sentence_geography": {}}}]}
    assert leaf_tasks(manifest) == ["boolq", "next_sentence_people", "next_sentence_geography"]
    half = {"boolq": [5, 1], "next_sentence_people": [2], "next_sentence_geography": [0, 3]}
    assert lm_eval_samples(half, leaf_tasks(manifest)) == {"boolq": [1, 5], "next_sentence_people": [2],
                                                          "next_sentence_geography": [0, 3]}
    with pytest.raises(FangError, match=r"no questions for task\(s\) \['next_sentence_geography'\]"):
        lm_eval_samples({"boolq": [1], "next_sentence_people": [2]}, leaf_tasks(manifest))


def test_the_decision_names_what_stays_the_default_unless_every_pair_is_won():
    from fang.evaluation.recipe import decision_sentence

    def verdict(s, b, word):
        return {"sparsity": s, "baseline": b, "avg7": {"verdict": word}}

    won = {"recipe": "r", "verdicts": [verdict(s, b, "better") for s in (0.2, 0.3, 0.4) for b in ("obc", "flap")]}
    assert decision_sentence(won, [0.3, 0.4], "o_fang").startswith("r is detectably better than every baseline at 30% and 40%")
    # a loss at 20% does not count (it is not a decision sparsity); one pair at 40% does
    won["verdicts"][0]["avg7"]["verdict"] = "worse"
    assert "every baseline" in decision_sentence(won, [0.3, 0.4], "o_fang")
    won["verdicts"][-1]["avg7"]["verdict"] = "no detectable difference"
    lost = decision_sentence(won, [0.3, 0.4], "o_fang")
    assert "3 of the 4 baseline pairs" in lost and lost.endswith("the main job keeps `o_fang`.")


def test_recipe_confirm_reuses_only_a_fresh_confirmation_evaluation_of_the_same_model(tmp_path):
    """`fang recipe-confirm --reuse DIR`: an evaluation `fang evaluate --half confirmation` wrote for the choice's
    model is taken; one of another model, another half, or older than the model is refused in one line."""
    import os

    from stages.recipe_confirm import reusable

    model, halves = tmp_path / "cells/r-0.3", tmp_path / "halves.json"
    model.mkdir(parents=True)
    (model / "structure.json").write_text("{}")
    f = tmp_path / "reuse/r-0.3.metrics.json"
    assert reusable(f, model, halves) is None  # nothing written: evaluate
    f.parent.mkdir()
    good = {"model": str(model), "questions": {"split": str(halves), "half": "confirmation"}, "ppl": 1.0}
    f.write_text(json.dumps(good))
    assert reusable(f, model, halves) == good
    for bad, words in [({"questions": {"split": str(halves), "half": "tuning"}}, "not a confirmation-half"),
                       ({"model": "cells/other-0.3"}, "not .*r-0.3")]:
        f.write_text(json.dumps(good | bad))
        with pytest.raises(FangError, match=words):
            reusable(f, model, halves)
    f.write_text(json.dumps(good))
    os.utime(f, (1, 1))  # written before the model was pruned again
    with pytest.raises(FangError, match="older than"):
        reusable(f, model, halves)
