"""BIG-bench multiple-choice tasks as lm-eval tasks: read task.json from a folder or the bigbench sdist in
place, convert a task (or subtask) into a JSONL + YAML pair named ``bb_<name>``."""

from __future__ import annotations

import json
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Iterable, Mapping

from ..core.errors import FangError, require
from .task_files import TaskInfo, _stats, _task_config, _write_jsonl, _write_loader, _write_yaml


# The bigbench==1.0.0 sdist that once carried every task.json is no longer served by the package index
# (only bigbench 0.0.1, without task files): the name is kept to say so, not to fetch it.
EMBEDDED_BIGBENCH = "embedded:bigbench"
BIGBENCH_PACKAGE = "bigbench==1.0.0"


BIGBENCH_PREFIX = "bb_"  # lm-eval name of a converted BIG-bench task: bb_<task>[_<subtask>]
# BIG-bench json_task defaults when a task.json does not set them.
BB_INPUT_PREFIX = "\nQ: "
BB_OUTPUT_PREFIX = "\nA: "


BB_CHOICE_PREFIX = "\n  choice: "


class BigBenchSource:
    """Task JSONs of BIG-bench, from an extracted folder or straight out of the sdist tarball.

    Names are ``task`` or ``task/subtask``. Reading from the 358 MB tarball decompresses the
    stream once per `read` call (a few seconds), extracting only the requested members.
    """

    def __init__(self, path: Path, kind: str):
        self.path = path
        self.kind = kind  # "folder" or "tarball"
        self._mc_names: list[str] | None = None

    def __repr__(self) -> str:
        return f"BigBenchSource({self.kind}: {self.path})"

    # -- raw access
    def _iter_jsons(self, wanted: set[str] | None) -> Iterable[tuple[str, dict | None]]:
        """Yield (name, parsed task.json) for every task.json; parsed only if `wanted` is None or has it."""
        if self.kind == "folder":
            for p in sorted(self.path.glob("*/task.json")) + sorted(self.path.glob("*/*/task.json")):
                name = p.parent.relative_to(self.path).as_posix()
                yield name, (_load_json(p) if wanted is None or name in wanted else None)
            return
        try:
            with tarfile.open(self.path, "r|gz") as tf:  # stream: gzip cannot seek anyway
                for member in tf:
                    name = _tar_task_name(member.name)
                    if name is None or not member.isfile():
                        continue
                    if wanted is not None and name not in wanted:
                        yield name, None
                        continue
                    fh = tf.extractfile(member)
                    try:
                        yield name, json.loads(fh.read().decode("utf-8")) if fh else None
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        raise FangError(f"{self.path}: {member.name} is not valid JSON: {exc}") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise FangError(f"cannot read BIG-bench archive {self.path}: {exc}") from None

    def read(self, names: Iterable[str]) -> tuple[dict[str, dict], list[str]]:
        """The task JSONs of `names` (those that exist) and the sorted list of all task names."""
        wanted = set(names)
        found: dict[str, dict] = {}
        every: list[str] = []
        for name, task in self._iter_jsons(wanted):
            every.append(name)
            if task is not None:
                found[name] = task
        return found, sorted(every)

    def mc_names(self) -> list[str]:
        """Names whose examples are all multiple choice (subtasks included as task/subtask)."""
        if self._mc_names is None:
            self._mc_names = sorted(name for name, task in self._iter_jsons(None) if task and _is_multiple_choice(task))
        return self._mc_names


def _tar_task_name(member: str) -> str | None:
    parts = member.split("/")
    if parts[-1] != "task.json" or "benchmark_tasks" not in parts:
        return None
    rel = parts[parts.index("benchmark_tasks") + 1 : -1]
    return "/".join(rel) if 1 <= len(rel) <= 2 else None


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise FangError(f"{path} is not valid JSON: {exc}") from None


def read_bigbench_source(source: str | os.PathLike) -> BigBenchSource:
    """Open `source`: a folder holding ``<task>/task.json`` (a git checkout's ``bigbench/benchmark_tasks``
    or a parent of it), or a bigbench ``.tar.gz``."""
    if str(source) == EMBEDDED_BIGBENCH:
        raise FangError(
            f"data.bigbench={EMBEDDED_BIGBENCH!r} is gone: the package index no longer serves {BIGBENCH_PACKAGE} "
            "(it has only 0.0.1, without task files); set data.bigbench to a local folder of <task>/task.json "
            "(google/BIG-bench's bigbench/benchmark_tasks) or a bigbench .tar.gz"
        )
    path = Path(source).expanduser()
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        return BigBenchSource(path, "tarball")
    if path.is_dir():
        for candidate in (path, path / "benchmark_tasks", path / "bigbench" / "benchmark_tasks"):
            if candidate.is_dir() and any(candidate.glob("*/task.json")):
                return BigBenchSource(candidate, "folder")
        raise FangError(f"BIG-bench folder {path} holds no <task>/task.json")
    raise FangError(f"BIG-bench source not found: {source!r} (use a folder of <task>/task.json or a bigbench .tar.gz)")


def _as_source(source: str | os.PathLike | BigBenchSource) -> BigBenchSource:
    return source if isinstance(source, BigBenchSource) else read_bigbench_source(source)


def bigbench_task_names(source: str | os.PathLike | BigBenchSource) -> list[str]:
    """Sorted names of the multiple-choice BIG-bench tasks (and ``task/subtask``s) in `source`."""
    return _as_source(source).mc_names()


def _is_multiple_choice(task: Mapping) -> bool:
    examples = task.get("examples")
    return bool(examples) and all(isinstance(e.get("target_scores"), dict) and len(e["target_scores"]) >= 2 for e in examples)


def _jinja_literal(text: str) -> str:
    """`text` as a literal inside a jinja template, whatever it holds.

    Jinja markup needs a "{", so text without one is inert and stays as it is (generated YAMLs do
    not change). Any other text becomes a Jinja string expression: a `{% raw %}` block would be
    closed early by an "{% endraw %}" inside the text, and a text ending in "{" would merge with the
    template's next "{{". json.dumps escapes quotes, backslashes and control characters with
    escapes Jinja's string literals decode the same way.
    """
    if "{" not in text:
        return text
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _bigbench_template(task: Mapping) -> tuple[str, str]:
    """(doc_to_text template, target_delimiter) reproducing BIG-bench's zero-shot prompt.

    BIG-bench scores each choice after ``task_prefix + input_prefix + input [+ choices] + output_prefix``.
    lm-eval appends ``target_delimiter + choice``, so trailing spaces of the output prefix move
    into the delimiter (no double space) and a prefix ending in a newline gets no delimiter.
    """
    task_prefix = task.get("task_prefix") or ""
    input_prefix = task.get("example_input_prefix", BB_INPUT_PREFIX)
    output_prefix = task.get("example_output_prefix", BB_OUTPUT_PREFIX)
    choice_prefix = task.get("choice_prefix", BB_CHOICE_PREFIX)
    head = (task_prefix + input_prefix).lstrip()  # nothing precedes the prompt in zero-shot
    text = _jinja_literal(head) + "{{question}}"
    if task.get("append_choices_to_input", True):
        text += "{% for c in choices %}" + _jinja_literal(choice_prefix) + "{{c}}{% endfor %}"
    tail = output_prefix.rstrip(" ")
    text += _jinja_literal(tail)
    delimiter = "" if tail.endswith(("\n", "\t")) else " "
    return text, delimiter


def _bigbench_rows(task: Mapping, name: str, seed: int) -> tuple[list[dict], int]:
    """Shuffled examples as rows (so a `limit` evaluates a random subset), and how many were skipped."""
    rng = random.Random(f"{seed}:bigbench:{name}")
    rows, skipped = [], 0
    for ex in task["examples"]:
        scores = {str(k).strip(): float(v) for k, v in ex["target_scores"].items()}
        question = str(ex.get("input", "")).strip()
        # a choice that is empty after stripping cannot be scored; all-zero scores have no answer
        if len(scores) < 2 or "" in scores or max(scores.values()) <= 0 or not question:
            skipped += 1
            continue
        choices = list(scores)
        rng.shuffle(choices)
        best = max(scores.values())
        gold = [i for i, c in enumerate(choices) if scores[c] == best]
        rows.append({"question": question, "choices": choices, "label": gold[0], "gold": gold})
    rng.shuffle(rows)
    return rows, skipped


def _lm_eval_name(name: str) -> str:
    return BIGBENCH_PREFIX + re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()


def _check_bigbench_task(task: Mapping, name: str, subtasks: list[str] | None = None) -> None:
    examples = task.get("examples")
    if not examples:
        if subtasks:
            raise FangError(
                f"BIG-bench task {name!r} is a folder of subtasks; name one as '{name}/<subtask>', "
                f"e.g. {', '.join(subtasks[:6])}"
            )
        raise FangError(
            f"BIG-bench task {name!r} has no examples in its task.json: it is either a folder of subtasks "
            f"(name one as '{name}/<subtask>') or a programmatic task, which fang does not support"
        )
    for key in ("task_prefix", "example_input_prefix", "example_output_prefix", "choice_prefix"):
        value = task.get(key)
        if value is not None and not isinstance(value, str):
            raise FangError(f"BIG-bench task {name!r}: its task.json has {key}={value!r}, which is not text")
    if not _is_multiple_choice(task):
        raise FangError(
            f"BIG-bench task {name!r} is not multiple choice (its examples have a generative 'target' and no "
            "'target_scores'): only multiple-choice tasks can be scored by log-likelihood"
        )


def _build_bigbench(task: Mapping, out_dir: Path, name: str, seed: int) -> TaskInfo:
    _check_bigbench_task(task, name)
    rows, skipped = _bigbench_rows(task, name, seed)
    require(len(rows) > 0, f"BIG-bench task {name!r}: no usable multiple-choice example")
    task_name = _lm_eval_name(name)
    template, delimiter = _bigbench_template(task)
    has_ties = any(len(r["gold"]) > 1 for r in rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_loader(out_dir)
    _write_jsonl(out_dir / f"{task_name}.jsonl", rows)
    # `gold` (all best-scoring choices) only where ties exist: lm-eval then counts any of them correct
    target = "gold" if has_ties else "label"
    meta = {"source": f"bigbench:{name}", "description": str(task.get("description", ""))}
    _write_yaml(out_dir / f"{task_name}.yaml", _task_config(task_name, f"{task_name}.jsonl", template, target, delimiter, meta))
    return _stats(rows, task_name, skipped_examples=skipped)


def build_bigbench_task(
    task_json_path: str | os.PathLike | Mapping, out_dir: str | os.PathLike, name: str, seed: int = 0
) -> Path:
    """Convert one BIG-bench multiple-choice task.json (a path or its parsed dict) into
    ``out_dir/bb_<name>.{jsonl,yaml}``; returns the YAML path. Examples and choice order are
    shuffled deterministically by `seed`."""
    task = task_json_path if isinstance(task_json_path, Mapping) else _load_json(Path(task_json_path))
    info = _build_bigbench(task, Path(out_dir), name, seed)
    return Path(out_dir) / f"{info.lm_eval_task}.yaml"
