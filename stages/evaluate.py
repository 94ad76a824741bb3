"""evaluate: perplexity on the test split (overall and per topic) and zero-shot accuracy via lm-eval."""

from dataclasses import replace
from pathlib import Path

from fang.core import paths
from fang.core.atomic import read_json, write_json
from fang.core.errors import require
from fang.core.outputs import guard_output
from fang.core.params import load_block
from fang.core.progress import console
from fang.evaluation.halves import HALVES


def run(params_path: str = "params.yaml", model_dir: str = str(paths.MODEL), out: str = str(paths.METRICS / "dense.json"),
        task_limit: int | None = None, dtype: str | None = None, questions: str | None = None,
        half: str | None = None) -> None:
    from fang.evaluation.evaluate import evaluate_model

    p = load_block("evaluate", path=params_path)
    require((questions is None) == (half is None), "--questions and --half go together (a split file and which half of it to score)")
    require(half is None or half in HALVES, f"--half {half!r}: use {' or '.join(HALVES)}")
    require(questions is None or task_limit is None, "give --questions/--half or --task-limit, not both")
    guard_output(out, "metrics", "--out", [model_dir] + ([questions] if questions else []))
    if dtype is not None:  # `fang evaluate --dtype`: one evaluation in another precision
        p = replace(p, dtype=dtype)
        p.validate()
    split = read_json(Path(questions))["halves"][half] if questions else None
    offload = load_block("model", path=params_path).offload  # 70B-class models: one block on the device at a time
    metrics = evaluate_model(model_dir, p, offload, p.task_limit if task_limit is None else task_limit, split)
    if split is not None:
        metrics["questions"] = {"split": questions, "half": half}
    write_json(Path(out), metrics)
    console.print(f"{model_dir}: ppl {metrics['ppl']:.2f}; " + ", ".join(f"{k} {v['acc']:.3f}" for k, v in metrics["tasks"].items()))
