"""The recipe study: choose FANG's recipe on the tuning half of the dev questions, confirm it on the other.

Every candidate (a recipe, `fang.core.choices.parse_recipe`) is pruned at each search sparsity and scored
on the tuning half only (`fang.evaluation.halves`). The search table lists every candidate: its
seven-task average on the tuning half, its paired difference against each baseline there, and its
perplexity on the calibration domain (the corpus's test split). The choice is one recipe for every
sparsity (a default must be one recipe): the highest tuning-half average over the search sparsities,
ties broken by the lower calibration-domain perplexity. Only then is the choice scored on the
confirmation half, once, paired against every baseline; those verdicts are the study's result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..core.errors import require
from ..data.paper_tasks import PAPER_TASKS
from .halves import restrict
from .paired import BETTER, accuracy_difference, perplexity_differences
from .report import PAPER_AVG, paired_examples

AVG_KEY = f"average_{PAPER_AVG.lower()}"


def seven_task_average(metrics: Mapping) -> tuple[float, float]:
    """(Avg7, its standard error) from evaluate's metrics: the mean of each task's reported metric
    (acc_norm where lm-eval gives it, else acc), SE from the per-task SEs (independent tasks)."""
    examples, metric_of = paired_examples(dict(metrics))
    missing = [t for t in PAPER_TASKS if t not in examples]
    require(not missing, f"{metrics.get('model', 'a model')}: no per-question scores for {missing}")
    means, variances = [], []
    for t in PAPER_TASKS:
        x = examples[t][metric_of[t]]
        m = sum(x) / len(x)
        means.append(m)
        variances.append(m * (1 - m) / max(len(x) - 1, 1))
    return sum(means) / len(means), math.sqrt(sum(variances)) / len(means)


def paired_average(a: Mapping, b: Mapping) -> dict:
    """B - A on the seven-task average, paired on the questions both answered (a Comparison dict)."""
    ex_a, metric_of = paired_examples(dict(a))
    ex_b, _ = paired_examples(dict(b))
    res = accuracy_difference({t: ex_a[t] for t in PAPER_TASKS}, {t: ex_b[t] for t in PAPER_TASKS}, metric_of)
    return res["average"].as_dict()


def search_table(candidates: Mapping[tuple[str, float], Mapping], baselines: Mapping[tuple[str, float], Mapping],
                 tuning: Mapping[str, Sequence[int]]) -> list[dict]:
    """One row per (candidate, sparsity): tuning-half Avg7 ± SE, calibration-domain perplexity, and the paired
    tuning-half difference against each baseline at that sparsity. Every metrics dict is cut to the tuning
    half first, so a candidate evaluated on all questions (a sweep row) is judged on the same ones."""
    rows = []
    for (name, sparsity), metrics in sorted(candidates.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cut = restrict(metrics, tuning)
        avg, se = seven_task_average(cut)
        row = {"recipe": name, "sparsity": sparsity, "avg7": avg, "avg7_se": se, "ppl": metrics["ppl"],
               "vs": {}}
        for (base, bs), bm in sorted(baselines.items()):
            if bs == sparsity:
                row["vs"][base] = paired_average(restrict(bm, tuning), cut)
        rows.append(row)
    return rows


def choose(rows: Sequence[Mapping], sparsities: Sequence[float]) -> dict:
    """The recipe with the highest mean tuning-half Avg7 over `sparsities` (ties: lower mean perplexity).
    Only recipes scored at every one of them compete."""
    by_recipe: dict[str, dict[float, Mapping]] = {}
    for r in rows:
        by_recipe.setdefault(r["recipe"], {})[r["sparsity"]] = r
    complete = {n: v for n, v in by_recipe.items() if all(s in v for s in sparsities)}
    require(complete, f"no candidate was scored at every search sparsity {list(sparsities)}")

    def key(name: str) -> tuple[float, float]:
        cells = complete[name]
        mean_avg = sum(cells[s]["avg7"] for s in sparsities) / len(sparsities)
        mean_log_ppl = sum(math.log(cells[s]["ppl"]) for s in sparsities) / len(sparsities)
        return (-mean_avg, mean_log_ppl)

    ranked = sorted(complete, key=key)
    best = ranked[0]
    return {"recipe": best, "sparsities": list(sparsities), "ranking": ranked,
            "mean_avg7": -key(best)[0], "rule": "highest mean tuning-half Avg7 over the search sparsities; "
                                                 "ties: lower mean calibration-domain perplexity"}


def confirm(choice: str, chosen: Mapping[float, Mapping], baselines: Mapping[tuple[str, float], Mapping],
            confirmation: Mapping[str, Sequence[int]]) -> dict:
    """The chosen recipe against every baseline at every sparsity, paired on the confirmation half:
    Avg7 difference and perplexity ratio (same windows), each with its 95% interval and verdict.
    `wins_everywhere` is true when Avg7 is detectably better against every baseline at every sparsity."""
    verdicts = []
    for (base, sparsity), bm in sorted(baselines.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if sparsity not in chosen:
            continue
        a, b = restrict(bm, confirmation), restrict(chosen[sparsity], confirmation)
        ppl = perplexity_differences(bm.get("ppl_windows"), chosen[sparsity].get("ppl_windows"))["overall"]
        verdicts.append({"recipe": choice, "baseline": base, "sparsity": sparsity,
                         "avg7": paired_average(a, b), "ppl": ppl.as_dict(),
                         "avg7_recipe": seven_task_average(b)[0], "avg7_baseline": seven_task_average(a)[0]})
    require(verdicts, f"{choice}: no baseline was evaluated at the sparsities it was confirmed at ({sorted(chosen)})")
    return {"recipe": choice, "verdicts": verdicts,
            "wins_everywhere": all(v["avg7"]["verdict"] == BETTER for v in verdicts)}
