"""The next-sentence task: the first sentence of a test article, its true second sentence against three
second sentences of other articles of the same topic; one lm-eval task per topic plus a group."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import yaml

from ..core.atomic import atomic_file
from ..core.errors import FangError, require
from .task_files import TaskInfo, _stats, _task_config, _write_jsonl, _write_loader, _write_yaml


NEXT_SENTENCE = "next_sentence"
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
