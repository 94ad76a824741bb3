"""Article-level splits, topic filtering and calibration sampling."""

import json

import pytest
import torch

from fang.core.errors import FangError
from fang.data.corpus import filter_topics, read_wiki_summaries, sample_calibration, split_rows


class CharTokenizer:
    """One token per character: enough to test windowing without a real vocabulary."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 100) for c in text]}


def make_rows(n_per_topic=20, topics=("People", "Geography", "Mathematics")):
    return [
        {"id": f"{t}-{i}", "title": f"{t} {i}", "topic": t, "text": f"Article {i} about {t}. " * 5}
        for t in topics
        for i in range(n_per_topic)
    ]


def test_read_wiki_summaries_skips_empty_and_sorts(tmp_path):
    path = tmp_path / "summaries.json"
    path.write_text(json.dumps({
        "b": {"title": "B", "extract": "Bee text.", "topic": "Biology"},
        "a": {"title": "A", "extract": "Aye text.", "topic": "Arts"},
        "c": {"title": "C", "extract": "", "topic": "Arts"},
    }))
    rows = read_wiki_summaries(path)
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0] == {"id": "a", "title": "A", "topic": "Arts", "text": "Aye text."}


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FangError, match="corpus file not found"):
        read_wiki_summaries(tmp_path / "nope.json")


def test_splits_are_disjoint_complete_stratified_and_deterministic():
    rows = make_rows()
    splits = split_rows(rows, seed=3, validation_fraction=0.1, test_fraction=0.2)
    ids = {k: {r["id"] for r in v} for k, v in splits.items()}
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["validation"]) and not (ids["validation"] & ids["test"])
    assert set().union(*ids.values()) == {r["id"] for r in rows}
    for name in ("train", "validation", "test"):
        assert {r["topic"] for r in splits[name]} == {"People", "Geography", "Mathematics"}
    assert len(splits["test"]) == 3 * 4
    again = split_rows(rows, seed=3, validation_fraction=0.1, test_fraction=0.2)
    assert [r["id"] for r in again["test"]] == [r["id"] for r in splits["test"]]
    other = split_rows(rows, seed=4, validation_fraction=0.1, test_fraction=0.2)
    assert [r["id"] for r in other["test"]] != [r["id"] for r in splits["test"]]


def test_topic_filter_keeps_only_that_topic_and_rejects_unknown():
    rows = make_rows()
    only = filter_topics(rows, ["People"])
    assert only and all(r["topic"] == "People" for r in only)
    assert filter_topics(rows, []) == rows
    with pytest.raises(FangError, match="unknown topic"):
        filter_topics(rows, ["Astrology"])


def test_calibration_windows_come_only_from_filtered_topic():
    rows = filter_topics(make_rows(), ["Geography"])
    ids, articles = sample_calibration(rows, CharTokenizer(), n_samples=4, seq_len=64, seed=0)
    assert ids.shape == (4, 64) and ids.dtype == torch.long
    assert all(a.startswith("Geography-") for window in articles for a in window)


def test_calibration_is_seeded():
    rows = make_rows()
    a, _ = sample_calibration(rows, CharTokenizer(), 3, 50, seed=1)
    b, _ = sample_calibration(rows, CharTokenizer(), 3, 50, seed=1)
    c, _ = sample_calibration(rows, CharTokenizer(), 3, 50, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_corpus_too_small_names_the_numbers():
    rows = make_rows(n_per_topic=1, topics=("Mathematics",))
    with pytest.raises(FangError, match=r"corpus too small.*8 x 512"):
        sample_calibration(rows, CharTokenizer(), 8, 512, seed=0)
