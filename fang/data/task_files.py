"""The files of one lm-eval task in the task folder: JSONL rows, YAML config, the shared dataset loader,
and the check that a folder's `!function` modules are the loader fang wrote."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.atomic import atomic_file
from ..core.errors import FangError, require


MANIFEST = "tasks.json"
LOADER_MODULE = "_fang_data"


_METRICS = [
    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
]


_LOADER_SOURCE = '''"""Dataset loader for the lm-eval task YAMLs in this folder (written by fang.tasks).

lm-eval calls `load(**metadata, **dataset_kwargs)`; relative `data_files` are resolved against
this file's folder rather than the working directory, so the folder stays relocatable.
"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def load(data_files=None, **_ignored):
    splits = {}
    for split, name in (data_files or {}).items():
        path = Path(name) if Path(name).is_absolute() else HERE / name
        with open(path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
'''


@dataclass
class TaskInfo:
    """What was written for one lm-eval task: its name, file and size statistics."""

    lm_eval_task: str
    n_examples: int
    n_choices: list[int]  # distinct numbers of choices, sorted
    chance_acc: float  # expected accuracy of a uniform random guess (ties count as correct)
    extra: dict[str, Any] = field(default_factory=dict)


def _write_loader(out_dir: Path) -> None:
    path = out_dir / f"{LOADER_MODULE}.py"
    if not path.exists() or path.read_text() != _LOADER_SOURCE:
        with atomic_file(path) as fh:
            fh.write(_LOADER_SOURCE)


LOADER_SHA256 = hashlib.sha256(_LOADER_SOURCE.encode()).hexdigest()
_FUNCTION_TAG = re.compile(r"!function\s+([^\s#]+)")


def verify_task_folder(task_dir: str | os.PathLike) -> None:
    """Refuse a task folder lm-eval would run foreign code from.

    lm-eval imports every `!function module.name` a task YAML names, from the YAML's folder. The
    folder may come from a shared DVC remote, so the only Python allowed is the loader fang writes,
    byte for byte (its sha256 is fixed by this code), and `!function` may name nothing else.
    """
    task_dir = Path(task_dir)
    loader = task_dir / f"{LOADER_MODULE}.py"
    if loader.exists() and hashlib.sha256(loader.read_bytes()).hexdigest() != LOADER_SHA256:
        raise FangError(f"{loader} differs from the loader fang writes (sha256 mismatch): refusing to let lm-eval "
                        "import it; rebuild the tasks with `dvc repro fetch_data`")
    foreign = sorted(p.name for p in task_dir.rglob("*.py") if p != loader)
    require(not foreign, f"{task_dir} holds Python files fang did not write ({', '.join(foreign)}): refusing to "
                         "evaluate; rebuild the tasks with `dvc repro fetch_data`")
    for path in sorted([*task_dir.rglob("*.yaml"), *task_dir.rglob("*.yml")]):
        hooks = sorted(set(_FUNCTION_TAG.findall(path.read_text(errors="replace"))) - {f"{LOADER_MODULE}.load"})
        require(not hooks, f"{path} names a Python hook fang did not write (!function {', '.join(hooks)}): refusing "
                           "to evaluate; rebuild the tasks with `dvc repro fetch_data`")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_yaml(path: Path, config: dict) -> None:
    # `custom_dataset` needs the `!function` tag, which safe_dump cannot emit: append it by hand.
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000)
    text += f"custom_dataset: !function {LOADER_MODULE}.load\n"
    with atomic_file(path) as fh:
        fh.write(text)


def _task_config(task_name: str, data_file: str, doc_to_text: str, doc_to_target: str, delimiter: str, meta: dict) -> dict:
    return {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},  # relative to this YAML's folder (see _fang_data.py)
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": doc_to_text,
        "doc_to_choice": "choices",  # a field name: lm-eval returns the list as stored
        "doc_to_target": doc_to_target,
        "target_delimiter": delimiter,
        "num_fewshot": 0,
        "metric_list": [dict(m) for m in _METRICS],
        "metadata": {"version": 1.0, **meta},
    }


def _stats(rows: list[dict], task_name: str, **extra: Any) -> TaskInfo:
    n_choices = sorted({len(r["choices"]) for r in rows})
    chance = sum(len(r["gold"]) / len(r["choices"]) for r in rows) / len(rows)
    return TaskInfo(task_name, len(rows), n_choices, round(chance, 6), extra)
