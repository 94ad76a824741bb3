"""screen_tasks: run the dense model on every affordable BIG-bench multiple-choice task (and the
next-sentence task) and keep, as the suggested dev set, those it does clearly above chance."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from fang.core import paths
from fang.core.atomic import atomic_dir, read_json
from fang.core.device import pick_device
from fang.core.errors import FangError
from fang.core.markdown import replace_between_markers
from fang.core.params import load_block
from fang.core.progress import console
from fang.data.bigbench import read_bigbench_source
from fang.data.corpus import read_jsonl
from fang.data.tasks import build_task_folder
from fang.evaluation.task_screen import (
    SCREEN_END,
    SCREEN_START,
    Candidate,
    ScreenResult,
    bigbench_candidates,
    candidate_pool,
    choose_dev_set,
    confirm_within_budget,
    decide_probe,
    markdown,
    next_sentence_candidate,
    results_block,
    results_note,
    size_from_task_folder,
    task_score,
)
from fang.model.offload import load_dense_offloaded, streamed_forward


def _evaluate(model, tokenizer, task_dir: Path, lm_names: dict[str, str], limit: int | None, batch: int) -> dict:
    from fang.evaluation.evaluate import zero_shot

    with streamed_forward(model):  # a streamed model (model.offload): each block fetched as the forward reaches it
        return zero_shot(model, tokenizer, task_dir, list(lm_names.values()), limit, batch)


def run(params_path: str = "params.yaml", results: str | None = None) -> None:
    if results:  # publish the last screen; no model run
        result = read_json(paths.SCREEN / "screen.json")
        replace_between_markers(results, results_block(result, time.strftime("%Y-%m-%dT%H:%M:%S")),
                                SCREEN_START, SCREEN_END)
        console.print(f"screen -> {results}")
        return
    p = load_block("screen", path=params_path)
    data = load_block("data", path=params_path)
    precision = load_block("evaluate", path=params_path).dtype  # decide in the precision the dev set is scored in
    if not data.bigbench:
        raise FangError("the task screen chooses among BIG-bench tasks, and data.bigbench is empty: set it to a "
                        "local folder of <task>/task.json (the default dev set, the paper's seven tasks, needs no screen)")
    source = read_bigbench_source(data.bigbench)
    device = pick_device()
    # model.offload: lm-eval runs the unmodified Hugging Face forward, so a streamed model fetches each block as
    # that forward reaches it (streamed_forward, as `fang evaluate` does): one block on the device at a time
    offload = load_block("model", path=params_path).offload
    model, tokenizer = load_dense_offloaded(paths.MODEL, device, precision, offload)
    candidates, examples_of = bigbench_candidates(source)
    test_rows = read_jsonl(paths.DATA / "test.jsonl")
    ns = next_sentence_candidate()
    pool = candidate_pool(candidates, examples_of, tokenizer, p) + [ns]
    with tempfile.TemporaryDirectory(prefix="fang-screen-") as tmp:
        task_dir = Path(tmp) / "tasks"
        manifest = build_task_folder([c.name for c in pool], source, test_rows, task_dir,
                                     data.next_sentence_per_topic, data.split_seed)
        rows_of = {f.stem: read_jsonl(f) for f in task_dir.glob("*.jsonl")}  # lm-eval task name -> its rows
        lm_names = size_from_task_folder(pool, manifest, rows_of, tokenizer)
        console.print(f"screen: probing {len(pool)} of {len(candidates) + 1} tasks on {p.probe_examples} questions each")
        probe = _evaluate(model, tokenizer, task_dir, lm_names, p.probe_examples, p.batch_size)
        survivors = [c for c in pool if decide_probe(c, task_score(probe, lm_names[c.name], rows_of), p.probe_min_z)]
        console.print(f"screen: {len(survivors)} above chance in the probe; every question of the strongest, "
                      f"until kept tasks fill {p.max_total_tokens} tokens")

        def evaluate_full(c: Candidate) -> dict:
            scored = task_score(_evaluate(model, tokenizer, task_dir, {c.name: lm_names[c.name]}, None, p.batch_size),
                                lm_names[c.name], rows_of)
            console.print(f"screen: {c.name}: {scored['acc']:.3f} on every question")
            return scored

        confirm_within_budget(survivors, evaluate_full, p.min_z, p.max_total_tokens)
    result = ScreenResult(str(paths.MODEL), candidates + [ns], settings={**vars(p), "dtype": precision})
    result.dev_set = choose_dev_set(result.candidates, p.max_total_tokens)
    out = result.as_dict()
    with atomic_dir(paths.SCREEN) as tmp:
        import json

        (tmp / "screen.json").write_text(json.dumps(out, indent=1))
        (tmp / "screen.md").write_text(results_note(out) + "\n\n" + markdown(out) + "\n")
    console.print(f"screen -> {paths.SCREEN}/screen.md; suggested data.tasks: {result.dev_set}")
