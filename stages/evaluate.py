"""evaluate: perplexity on the test split (overall and per topic) and zero-shot accuracy via lm-eval."""

import time
from dataclasses import replace
from pathlib import Path

from fang.core import paths
from fang.core.atomic import read_json, write_json
from fang.core.device import pick_device
from fang.core.errors import require
from fang.core.outputs import guard_output
from fang.core.params import PERPLEXITY_ONLY, load_block
from fang.core.progress import console
from fang.data.corpus import read_jsonl
from fang.model.modeling import count_block_params
from fang.model.offload import streamed_forward
from fang.model.shrink import load_any


def run(params_path: str = "params.yaml", model_dir: str = str(paths.MODEL), out: str = str(paths.METRICS / "dense.json"),
        task_limit: int | None = None, dtype: str | None = None) -> None:
    from fang.evaluation.evaluate import perplexity_by_topic, zero_shot
    from fang.data.task_files import verify_task_folder

    p = load_block("evaluate", path=params_path)
    guard_output(out, "metrics", "--out", [model_dir])
    if dtype is not None:  # `fang evaluate --dtype`: one evaluation in another precision
        p = replace(p, dtype=dtype)
        p.validate()
    device = pick_device()
    manifest = read_json(paths.TASKS / "tasks.json")
    verify_task_folder(paths.TASKS)  # before lm-eval imports anything from it
    offload = load_block("model", path=params_path).offload  # 70B-class models: one block on the device at a time
    model, tokenizer = load_any(model_dir, device, p.dtype, offload)
    require(tokenizer is not None, f"{model_dir} has no tokenizer (tokenizer.json, tokenizer_config.json): "
                                   f"copy them from {paths.MODEL} or prune it again")
    limit = p.task_limit if task_limit is None else task_limit
    tasks = [name for entry in manifest["tasks"] for name in entry["lm_eval_tasks"]]
    with streamed_forward(model):
        t0 = time.perf_counter()
        ppl = perplexity_by_topic(
            model, tokenizer, read_jsonl(paths.DATA / "test.jsonl"), p.ppl_seq_len, p.ppl_max_windows_per_topic, p.batch_size, device
        )
        t1 = time.perf_counter()
        acc = ({} if limit == PERPLEXITY_ONLY  # perplexity only: the bias study's default (README "Calibration bias")
               else zero_shot(model, tokenizer, paths.TASKS, tasks, limit or None, p.batch_size, p.shared_context))
        t2 = time.perf_counter()
    metrics = {
        "model": model_dir,
        "block_params": count_block_params(model),
        "ppl": ppl["overall"],
        "ppl_by_topic": ppl["by_topic"],
        "ppl_windows": {"nll": ppl["window_nll"], "tokens_per_window": ppl["window_tokens"]},
        "tasks": acc,
        "task_limit": limit,
        "dtype": p.dtype,
        "seconds": {"perplexity": round(t1 - t0, 1), "zero_shot": round(t2 - t1, 1)},
    }
    write_json(Path(out), metrics)
    console.print(f"{model_dir}: ppl {ppl['overall']:.2f}; " + ", ".join(f"{k} {v['acc']:.3f}" for k, v in acc.items()))
