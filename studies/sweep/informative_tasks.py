"""Re-judge the sweep's dev tasks with the screen's current rules, on the dense sweep evaluation, and
recompute the paired verdicts on the tasks that pass.

The screen that chose the dev set tested constant answers on choice indices and compared with
chance only; BIG-bench shuffles choices per question, so a model that always says "false" passed
(fang.evaluation.task_screen explains). Until the screen is rerun and every sweep model is
evaluated again, this script reads what the sweep already has: every question of every dev task
on the dense model (artifacts/sweep/dense.metrics.json) and on each evaluated cell.

    python studies/sweep/informative_tasks.py   # -> artifacts/report/informative_tasks.{json,md}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fang.core.atomic import atomic_file, write_json  # noqa: E402
from fang.core.markdown import markdown_table  # noqa: E402
from fang.core.params import SweepParams, load_block  # noqa: E402
from fang.data.corpus import read_jsonl  # noqa: E402
from fang.evaluation.report import Run, compare_runs, fmt_comparison, comparison_pairs  # noqa: E402
from fang.evaluation.task_screen import (  # noqa: E402
    CONSTANT_ANSWER, constant_share, given_answers, leaf_tasks, majority_rate, z_above_chance)

SWEEP, TASKS, OUT = ROOT / "artifacts/sweep", ROOT / "artifacts/data/tasks", ROOT / "artifacts/report"
MIN_Z = 3.0  # screen.min_z


def judge(dense: dict, rows_of: dict[str, list[dict]]) -> dict[str, dict]:
    """Per headline task: accuracy, chance, majority answer, z above the floor, constant share, keep?"""
    out = {}
    tasks = dense["tasks"]
    for name, entry in tasks.items():
        if name.startswith("next_sentence_"):
            continue
        rows = [r for leaf in leaf_tasks(rows_of, name) for r in rows_of[leaf]]
        texts = given_answers(tasks, name, rows_of)
        key = "acc_norm" if entry.get("acc_norm") is not None else "acc"
        chance = sum(len(r["gold"]) / len(r["choices"]) for r in rows) / len(rows)
        majority = majority_rate(rows)
        z = z_above_chance(entry[key], entry[f"{key}_stderr"], max(chance, majority))
        share = constant_share(texts)
        out[name] = {"metric": key, "acc": entry[key], "chance": chance, "majority": majority, "z": z,
                     "constant_share": share, "informative": z >= MIN_Z and share <= CONSTANT_ANSWER}
    return out


def only(metrics: dict, keep: list[str]) -> dict:
    """The metrics with the headline tasks not in `keep` (and their subtasks) removed."""
    tasks = {k: v for k, v in metrics["tasks"].items() if k in keep or any(k.startswith(f"{t}_") for t in keep)}
    return {**metrics, "tasks": tasks}


def main() -> None:
    sweep = load_block("sweep", SweepParams, path=ROOT / "params.yaml")
    dense = json.loads((SWEEP / "dense.metrics.json").read_text())
    rows_of = {f.stem: read_jsonl(f) for f in TASKS.glob("*.jsonl")}
    verdicts = judge(dense, rows_of)
    keep = [t for t, v in verdicts.items() if v["informative"]]
    runs = {(m, s): SWEEP / f"{m}-{s}.metrics.json" for m in sweep.methods for s in sweep.sparsities}
    pairs = []
    for method, base in comparison_pairs(list(sweep.methods)):
        for sp in sweep.sparsities:
            a, b = runs[(base, sp)], runs[(method, sp)]
            if not (a.exists() and b.exists()):
                continue
            ra = Run(base, sp, only(json.loads(a.read_text()), keep))
            rb = Run(method, sp, only(json.loads(b.read_text()), keep))
            pairs.append({"method": method, "baseline": base, "sparsity": sp, **compare_runs(ra, rb)})
    write_json(OUT / "informative_tasks.json", {"tasks": verdicts, "informative": keep, "pairs": pairs})
    task_rows = [[t, v["metric"], f"{v['acc'] * 100:.1f}", f"{v['chance'] * 100:.1f}", f"{v['majority'] * 100:.1f}",
                  f"{v['z']:.1f}", f"{v['constant_share']:.0%}", "yes" if v["informative"] else "**no**"]
                 for t, v in verdicts.items()]
    pair_rows = [[p["method"], p["baseline"], f"{p['sparsity']:.0%}",
                  fmt_comparison(p["accuracy"].get("average_all")),
                  fmt_comparison(p["accuracy"].get("average_out_of_domain")),
                  fmt_comparison(p["accuracy"].get("average_in_domain"))] for p in pairs]
    md = ("Dev tasks judged on the dense sweep evaluation (every question): z above the better of chance and "
          "the majority answer; constant share over answer texts.\n\n"
          + markdown_table(["task", "metric", "dense", "chance", "majority answer", "z", "same answer", "informative"], task_rows)
          + f"\n\nPaired accuracy differences (method − baseline, points, 95% interval) on the {len(keep)} informative "
          "tasks only:\n\n"
          + markdown_table(["method", "baseline", "sparsity", "Avg acc", "out-of-domain avg", "in-domain avg"], pair_rows))
    with atomic_file(OUT / "informative_tasks.md") as fh:
        fh.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
