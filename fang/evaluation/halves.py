"""A fixed split of the dev questions into a tuning half and a confirmation half.

A recipe chosen on the same questions that then judge it looks better than it is (the winner of many
noisy comparisons is partly the luckiest). The recipe study therefore chooses on one half of the dev
questions and confirms the choice once, paired, on the other half. The split is seeded and per task
(each task contributes half its questions to each side), and it is written to a JSON artifact
before any candidate is scored, so a reader can check which questions judged what.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from ..core.errors import require

HALVES = ("tuning", "confirmation")


def _task_seed(seed: int, task: str) -> int:
    """A stable per-task seed (Python's hash() of a str changes between processes)."""
    digest = hashlib.sha256(f"{seed}:{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def split_questions(doc_ids: Mapping[str, Sequence[int]], seed: int) -> dict[str, dict[str, list[int]]]:
    """{"tuning": {task: sorted doc ids}, "confirmation": {...}}: each task's questions shuffled with
    a seed of its own and cut in two (the tuning half gets the extra question of an odd count)."""
    require(len(doc_ids) > 0, "split_questions: no task given")
    out: dict[str, dict[str, list[int]]] = {h: {} for h in HALVES}
    for task in sorted(doc_ids):
        ids = sorted({int(d) for d in doc_ids[task]})
        require(len(ids) >= 2, f"task {task}: {len(ids)} question(s) cannot be split into two halves")
        order = np.random.default_rng(_task_seed(seed, task)).permutation(len(ids))
        cut = (len(ids) + 1) // 2
        out["tuning"][task] = sorted(ids[i] for i in order[:cut])
        out["confirmation"][task] = sorted(ids[i] for i in order[cut:])
    return out


def evaluated_questions(metrics: Mapping) -> dict[str, list[int]]:
    """The doc ids each task of an evaluation's metrics answered (tasks with per-question scores)."""
    return {t: list(e["per_example"]["doc_id"]) for t, e in metrics.get("tasks", {}).items()
            if isinstance(e, Mapping) and "per_example" in e}


def restrict(metrics: Mapping, questions: Mapping[str, Sequence[int]]) -> dict:
    """A copy of evaluate's metrics with every task's per-question scores cut to `questions[task]`, and its
    accuracy, standard error and count recomputed on them. Tasks missing from `questions` are dropped;
    a question the split names but the evaluation lacks is an error (the two were not made together)."""
    out = dict(metrics)
    tasks = {}
    for task, entry in metrics.get("tasks", {}).items():
        if task not in questions or "per_example" not in entry:
            continue
        pe = entry["per_example"]
        pos = {d: i for i, d in enumerate(pe["doc_id"])}
        wanted = list(questions[task])
        missing = [d for d in wanted if d not in pos]
        require(not missing, f"task {task}: {len(missing)} question(s) of the split (e.g. doc {missing[0] if missing else ''}) "
                             f"were not evaluated in {metrics.get('model', 'this evaluation')}")
        idx = [pos[d] for d in wanted]
        new_pe = {k: [v[i] for i in idx] for k, v in pe.items() if isinstance(v, list) and len(v) == len(pe["doc_id"])}
        new = dict(entry, per_example=new_pe, n=len(idx))
        for metric in ("acc", "acc_norm"):
            if metric in new_pe:
                x = np.asarray(new_pe[metric], dtype=np.float64)
                new[metric] = float(x.mean())
                new[f"{metric}_stderr"] = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else None
        tasks[task] = new
    out["tasks"] = tasks
    return out


def lm_eval_samples(questions: Mapping[str, Sequence[int]], tasks: Sequence[str]) -> dict[str, list[int]]:
    """lm-eval's `samples` argument (task -> sorted doc indices, which lm-eval requires sorted) for the
    `tasks` being evaluated; a task the split does not cover is an error, not a silent full run."""
    missing = [t for t in tasks if t not in questions]
    require(not missing, f"the question split has no questions for task(s) {missing}: it covers {sorted(questions)}")
    return {t: sorted(int(d) for d in questions[t]) for t in tasks}
