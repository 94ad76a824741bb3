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
from ..core.markdown import markdown_table
from ..data.paper_tasks import PAPER_TASKS
from .halves import restrict
from .paired import BETTER, WORSE, accuracy_difference, perplexity_differences
from .report import PAPER_AVG, fmt_interval, paired_examples

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


def search_markdown(search: Mapping) -> str:
    """The whole search table: every candidate at every search sparsity, best mean first, with its
    tuning-half Avg7 ± SE, calibration-domain perplexity and paired difference against each baseline."""
    ranking = list(search["choice"]["ranking"])
    order = {name: i for i, name in enumerate(ranking)}
    rows = sorted(search["table"], key=lambda r: (r["sparsity"], order.get(r["recipe"], len(order)), r["recipe"]))
    baselines = sorted({b for r in rows for b in r["vs"]})
    header = ["sparsity", "recipe", "Avg7 (tuning half)", "PPL"] + [f"vs {b}" for b in baselines]
    body = []
    for r in rows:
        name = f"**{r['recipe']}**" if r["recipe"] == search["choice"]["recipe"] else r["recipe"]
        body.append([f"{r['sparsity']:.0%}", name, f"{100 * r['avg7']:.1f} ± {100 * r['avg7_se']:.1f}",
                     f"{r['ppl']:.2f}"] + [fmt_interval(r["vs"][b]) if b in r["vs"] else "" for b in baselines])
    return markdown_table(header, body)


def confirmation_markdown(confirmation: Mapping) -> str:
    """The chosen recipe against every baseline on the confirmation half: Avg7 points and perplexity, paired."""
    body = [[f"{v['sparsity']:.0%}", v["baseline"], f"{100 * v['avg7_recipe']:.1f}", f"{100 * v['avg7_baseline']:.1f}",
             f"{fmt_interval(v['avg7'])} {v['avg7']['verdict']}", f"{fmt_interval(v['ppl'], unit='%')} {v['ppl']['verdict']}"]
            for v in confirmation["verdicts"]]
    return markdown_table(["sparsity", "baseline", f"Avg7 {confirmation['recipe']}", "Avg7 baseline",
                           "Avg7 difference (points, 95%)", "PPL ratio − 1 (95%)"], body)


def ranking_means(search: Mapping) -> list[tuple[str, float]]:
    """Every candidate in the choice's ranking with its mean tuning-half Avg7 over the search sparsities."""
    sparsities = search["choice"]["sparsities"]
    avg = {(r["recipe"], r["sparsity"]): r["avg7"] for r in search["table"]}
    return [(name, sum(avg[(name, s)] for s in sparsities) / len(sparsities)) for name in search["choice"]["ranking"]]


def confirmation_grid(confirmation: Mapping) -> str:
    """The confirmation verdicts as one row per sparsity and one column per baseline (compact, for the README)."""
    baselines = list(dict.fromkeys(v["baseline"] for v in confirmation["verdicts"]))
    cells = {(v["sparsity"], v["baseline"]): v for v in confirmation["verdicts"]}
    word = {BETTER: f"**{BETTER}**", WORSE: f"**{WORSE}**"}
    rows = []
    for s in sorted({v["sparsity"] for v in confirmation["verdicts"]}):
        row = [f"{s:.0%}"]
        for b in baselines:
            v = cells.get((s, b))
            row.append("" if v is None else f"{fmt_interval(v['avg7'])} {word.get(v['avg7']['verdict'], 'n.d.')}; "
                                            f"PPL {100 * v['ppl']['estimate']:+.1f}%")
        rows.append(row)
    return markdown_table(["sparsity"] + baselines, rows) + "\n\n(n.d.: no detectable difference.)"


def decision_sentence(confirmation: Mapping, decision_sparsities: Sequence[float], default: str | None = None) -> str:
    """What the confirmation half says about the main job's default, by the rule of issue 28: the chosen
    recipe replaces it only if its Avg7 is detectably better than every baseline at every decision sparsity."""
    judged = [v for v in confirmation["verdicts"] if v["sparsity"] in decision_sparsities]
    beaten = [v for v in judged if v["avg7"]["verdict"] == BETTER]
    at = " and ".join(f"{s:.0%}" for s in decision_sparsities)
    if judged and len(beaten) == len(judged):
        return (f"{confirmation['recipe']} is detectably better than every baseline at {at} on the confirmation "
                f"half ({len(beaten)} of {len(judged)} pairs).")
    return (f"{confirmation['recipe']} is detectably better than {len(beaten)} of the {len(judged)} baseline pairs at "
            f"{at} on the confirmation half, not all of them, so by the study's rule it does not become the default"
            + (f": the main job keeps `{default}`." if default else "."))


def recipe_fragments(search: Mapping, confirmation: Mapping, when: str,
                     decision_sparsities: Sequence[float] = (0.3, 0.4), default: str | None = None) -> tuple[str, str]:
    """(the results page's block: search table, choice, confirmation table; the README's short block)."""
    choice = search["choice"]
    chosen = f"`{choice['recipe']}` (mean tuning-half Avg7 {100 * choice['mean_avg7']:.1f} over " + \
             ", ".join(f"{s:.0%}" for s in choice["sparsities"]) + f"; {len(choice['ranking'])} recipes compete)"
    decision = decision_sentence(confirmation, decision_sparsities, default)
    results = "\n".join([
        f"<!-- generated by `fang recipe-report --results` on {when}; rerun it instead of editing -->", "",
        f"Rule: {choice['rule']}. Chosen: {chosen}.", "",
        "**Search table** (tuning half; paired Avg7 differences in points against each baseline at the same "
        "sparsity, 95% bootstrap intervals; PPL on the calibration domain):", "",
        search_markdown(search), "",
        f"**Confirmation** (the other half, once; {confirmation['recipe']} minus the baseline):", "",
        confirmation_markdown(confirmation), "",
        decision,
    ])
    lines = [f"<!-- generated by `fang recipe-report --readme` on {when}; rerun it instead of editing -->", "",
             f"Chosen on the tuning half of the dev questions: {chosen}. Ranking by that mean: "
             + ", ".join(f"{name} {100 * mean:.1f}" for name, mean in ranking_means(search)) + ".", "",
             f"On the confirmation half, {confirmation['recipe']} minus each baseline: Avg7 points (95% interval), "
             "verdict, and the perplexity ratio:", "",
             confirmation_grid(confirmation), "",
             decision + " Every candidate's rows and intervals: "
             "[docs/results.md](docs/results.md#recipe-study)."]
    return results, "\n".join(lines)
