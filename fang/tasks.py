"""Zero-shot evaluation tasks as a local, relocatable lm-eval task folder.

Three kinds of task are supported:

* BIG-bench multiple-choice tasks (``social_iqa``, ``winowhy``, ...; a subtask as ``task/subtask``),
  converted from their ``task.json`` into a JSONL + YAML pair named ``bb_<name>``;
* ``next_sentence``: a 4-way next-sentence task built from the corpus test split, one lm-eval
  task per topic (``next_sentence_<topic>``) plus the group ``next_sentence`` that pools them;
* standard lm-eval hub tasks (``boolq``, ``hellaswag``, ...): only recorded in the manifest, as
  they are downloaded by lm-eval at evaluation time (network needed then).

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
import hashlib
import json
import os
import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .atomic import atomic_dir, atomic_file, write_json
from .errors import FangError, require
from .fetch import cache_dir, download_package

EMBEDDED_BIGBENCH = "embedded:bigbench"
BIGBENCH_PACKAGE = "bigbench==1.0.0"
BIGBENCH_PREFIX = "bb_"  # lm-eval name of a converted BIG-bench task: bb_<task>[_<subtask>]
NEXT_SENTENCE = "next_sentence"
MANIFEST = "tasks.json"
LOADER_MODULE = "_fang_data"

# Standard lm-eval tasks: not built, just named (nominal chance level for the manifest).
HUB_TASKS: dict[str, float] = {
    "boolq": 1 / 2,
    "hellaswag": 1 / 4,
    "winogrande": 1 / 2,
    "arc_easy": 1 / 4,
    "arc_challenge": 1 / 4,
    "openbookqa": 1 / 4,
    "piqa": 1 / 2,
}

# BIG-bench json_task defaults when a task.json does not set them.
BB_INPUT_PREFIX = "\nQ: "
BB_OUTPUT_PREFIX = "\nA: "
BB_CHOICE_PREFIX = "\n  choice: "

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


# --------------------------------------------------------------------------------------------
# BIG-bench sources: a folder of <task>/task.json, or the bigbench sdist read in place


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


def read_bigbench_source(source: str | os.PathLike, cache: str | os.PathLike | None = None) -> BigBenchSource:
    """Open `source`: "embedded:bigbench" (the PyPI sdist, downloaded once into the fang cache,
    ``$FANG_CACHE`` or ``~/.cache/fang``), a folder holding ``<task>/task.json``, a
    ``bigbench/benchmark_tasks`` parent of such a folder, or a bigbench ``.tar.gz``."""
    if str(source) == EMBEDDED_BIGBENCH:
        tarball = download_package(BIGBENCH_PACKAGE, Path(cache) if cache else cache_dir() / "downloads", sdist=True)
        return BigBenchSource(tarball, "tarball")
    path = Path(source).expanduser()
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        return BigBenchSource(path, "tarball")
    if path.is_dir():
        for candidate in (path, path / "benchmark_tasks", path / "bigbench" / "benchmark_tasks"):
            if candidate.is_dir() and any(candidate.glob("*/task.json")):
                return BigBenchSource(candidate, "folder")
        raise FangError(f"BIG-bench folder {path} holds no <task>/task.json")
    raise FangError(
        f"BIG-bench source not found: {source!r} (use {EMBEDDED_BIGBENCH!r}, a folder of <task>/task.json, "
        "or a bigbench .tar.gz)"
    )


def _as_source(source: str | os.PathLike | BigBenchSource) -> BigBenchSource:
    return source if isinstance(source, BigBenchSource) else read_bigbench_source(source)


def bigbench_task_names(source: str | os.PathLike | BigBenchSource) -> list[str]:
    """Sorted names of the multiple-choice BIG-bench tasks (and ``task/subtask``s) in `source`."""
    return _as_source(source).mc_names()


def _is_multiple_choice(task: Mapping) -> bool:
    examples = task.get("examples")
    return bool(examples) and all(isinstance(e.get("target_scores"), dict) and len(e["target_scores"]) >= 2 for e in examples)


# --------------------------------------------------------------------------------------------
# BIG-bench task -> JSONL + YAML


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


# --------------------------------------------------------------------------------------------
# next-sentence task from the corpus test split

# Words that end with a period without ending the sentence (lower case, without the final period).
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "mt", "ft", "gen", "col", "lt", "sgt", "capt", "gov",
    "sen", "rep", "rev", "hon", "pres", "vs", "etc", "cf", "approx", "ca", "c", "fl", "b", "d", "r", "no",
    "nos", "vol", "vols", "fig", "figs", "ed", "eds", "op", "pp", "p", "inc", "ltd", "co", "corp", "bros",
    "dept", "univ", "est", "al", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct",
    "nov", "dec", "ave", "blvd", "rd",
}
_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences: at . ! ? followed by space and a capital/digit, except after
    abbreviations (e.g. "Dr.", "St.", "c."), initials ("J. R. R.") and dotted acronyms ("U.S.",
    "e.g."). Line breaks always end a sentence. Errs towards merging, never mid-sentence cuts."""
    sentences: list[str] = []
    for para in re.split(r"\s*\n\s*", text):
        start = 0
        for m in _BOUNDARY.finditer(para):
            piece = para[start : m.start() + 1]
            if para[m.start()] == "." and _ends_with_abbreviation(piece):
                continue
            sentences.append(para[start : m.end()].strip())
            start = m.end()
        tail = para[start:].strip()
        if tail:
            sentences.append(tail)
    return [s for s in sentences if s]


def _ends_with_abbreviation(piece: str) -> bool:
    words = piece.split()
    if not words:
        return False
    word = words[-1].lstrip("\"'“‘([").rstrip(".")
    if word.lower() in _ABBREVIATIONS:
        return True
    if re.fullmatch(r"[A-Za-z]", word):  # an initial: "John F. Kennedy"
        return True
    return bool(re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", word))  # "U.S", "e.g", "Ph.D"


def topic_slug(topic: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", topic.lower()).strip("_") or "topic"


def _first_two(text: str) -> tuple[str, str] | None:
    sents = split_sentences(text)
    # very short pieces ("Thus.") are usually splitter debris or headings, not a usable sentence
    if len(sents) < 2 or len(sents[0].split()) < 3 or len(sents[1].split()) < 3:
        return None
    return sents[0], sents[1]


def _next_sentence_rows(rows: list[dict], topic: str, per_topic: int, seed: int, n_distractors: int = 3) -> list[dict]:
    eligible = []
    for row in sorted(rows, key=lambda r: str(r["id"])):  # independent of the order rows arrive in
        pair = _first_two(str(row.get("text", "")))
        if pair is not None:
            eligible.append((row, *pair))
    rng = random.Random(f"{seed}:{NEXT_SENTENCE}:{topic}")
    order = list(range(len(eligible)))
    rng.shuffle(order)
    out = []
    for i in order:
        if len(out) >= per_topic:
            break
        row, first, second = eligible[i]
        pool: dict[str, str] = {}  # distinct second sentence -> article id (first article wins)
        for j in order:
            if j != i and eligible[j][2] != second:
                pool.setdefault(eligible[j][2], str(eligible[j][0]["id"]))
        if len(pool) < n_distractors:
            continue
        distractors = rng.sample(sorted(pool), n_distractors)
        choices = [second, *distractors]
        rng.shuffle(choices)
        label = choices.index(second)
        out.append(
            {
                "id": str(row["id"]),
                "title": str(row.get("title", "")),
                "topic": topic,
                "context": first,
                "choices": choices,
                "label": label,
                "gold": [label],
                "distractor_ids": [pool[d] for d in choices if d != second],
            }
        )
    return out


def _build_next_sentence(test_rows: list[dict], out_dir: Path, per_topic: int, seed: int) -> tuple[list[TaskInfo], list[str]]:
    require(per_topic > 0, f"next-sentence examples per topic must be positive, got {per_topic}")
    by_topic: dict[str, list[dict]] = {}
    for row in test_rows:
        by_topic.setdefault(str(row.get("topic") or "Uncategorized"), []).append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_loader(out_dir)
    infos, skipped, used_slugs = [], [], set()
    for topic in sorted(by_topic):
        rows = _next_sentence_rows(by_topic[topic], topic, per_topic, seed)
        if not rows:
            skipped.append(topic)  # fewer than 4 articles with two sentences: no 4-way question
            continue
        slug = topic_slug(topic)
        while slug in used_slugs:
            slug += "_"
        used_slugs.add(slug)
        task_name = f"{NEXT_SENTENCE}_{slug}"
        _write_jsonl(out_dir / f"{task_name}.jsonl", rows)
        meta = {"source": f"next_sentence:{topic}"}
        _write_yaml(out_dir / f"{task_name}.yaml", _task_config(task_name, f"{task_name}.jsonl", "{{context}}", "label", " ", meta))
        infos.append(_stats(rows, task_name, topic=topic))
    if not infos:
        raise FangError(
            f"cannot build the next-sentence task: no topic of the test split ({len(test_rows)} articles) has 4 articles "
            "with at least two sentences; use a larger test split or drop 'next_sentence' from data.tasks"
        )
    group = {
        "group": NEXT_SENTENCE,
        "task": [i.lm_eval_task for i in infos],
        # size-weighted: the group score is the accuracy over all pooled examples
        "aggregate_metric_list": [
            {"metric": m, "aggregation": "mean", "weight_by_size": True} for m in ("acc", "acc_norm")
        ],
        "metadata": {"version": 1.0},
    }
    with atomic_file(out_dir / f"{NEXT_SENTENCE}.yaml") as fh:
        yaml.safe_dump(group, fh, sort_keys=False)
    return infos, skipped


def build_next_sentence_task(test_rows: list[dict], out_dir: str | os.PathLike, per_topic: int, seed: int) -> list[str]:
    """Write the next-sentence tasks: per topic, up to `per_topic` articles' first sentence as the
    context, its true second sentence plus the second sentences of 3 other same-topic articles as
    choices (order shuffled by `seed`). Returns the lm-eval names: the group first, then topics."""
    infos, _ = _build_next_sentence(test_rows, Path(out_dir), per_topic, seed)
    return [NEXT_SENTENCE] + [i.lm_eval_task for i in infos]


# --------------------------------------------------------------------------------------------
# the whole folder


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
        f"unknown evaluation task {name!r} in data.tasks: {hint}known are {NEXT_SENTENCE}, the lm-eval hub tasks "
        f"({', '.join(HUB_TASKS)}) and BIG-bench multiple-choice tasks (e.g. {sample}, ...)"
    )


def build_task_folder(
    task_names: list[str],
    bigbench_source: str | os.PathLike | BigBenchSource | None,
    test_rows: list[dict] | None,
    out_dir: str | os.PathLike,
    next_sentence_per_topic: int = 40,
    seed: int = 0,
) -> dict:
    """Write every requested task into `out_dir` (atomically, replacing it) plus ``tasks.json``.

    The manifest lists, per requested name and in request order: ``kind`` (bigbench /
    next_sentence / hub), ``lm_eval_tasks`` (names to pass to lm-eval; a group for next_sentence),
    ``n_examples``, ``n_choices`` (distinct choice counts), ``chance_acc`` (mean of 1/n_choices,
    ties counted) and, for next_sentence, per-topic ``subtasks``. Hub tasks get null sizes.
    """
    require(len(task_names) > 0, "no evaluation task requested (data.tasks is empty)")
    dupes = sorted({n for n in task_names if task_names.count(n) > 1})
    require(not dupes, f"evaluation task(s) listed twice in data.tasks: {', '.join(dupes)}")
    bb_names = [n for n in task_names if n not in HUB_TASKS and n != NEXT_SENTENCE]
    bb_tasks: dict[str, dict] = {}
    source = None
    if bb_names:
        require(bigbench_source is not None, f"BIG-bench task(s) {bb_names} requested but no BIG-bench source given")
        source = _as_source(bigbench_source)
        bb_tasks, every = source.read(bb_names)
        for name in bb_names:
            if name not in bb_tasks:
                raise _unknown_task_error(name, every)
            _check_bigbench_task(bb_tasks[name], name, [n for n in every if n.startswith(name + "/")])
    if NEXT_SENTENCE in task_names:
        require(bool(test_rows), "next_sentence requested but the test split is empty")

    entries = []
    with atomic_dir(out_dir) as tmp:
        for name in task_names:
            if name in HUB_TASKS:
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
            "seed": seed,
            "next_sentence_per_topic": next_sentence_per_topic if NEXT_SENTENCE in task_names else None,
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest
