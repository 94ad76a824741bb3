"""Text corpora as rows: local dataset folders and files, and WikiText lines cut into articles."""

from __future__ import annotations

import json

import pytest

from fang.core.errors import FangError
from fang.data.text_sources import _wikitext_articles, load_text_rows


def test_load_text_rows_local_folders(tmp_path):
    import datasets

    folder = tmp_path / "corpus"
    folder.mkdir()
    rows = [{"id": str(i), "title": f"T{i}", "topic": "Sci", "text": f"text {i}"} for i in range(3)]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "train.jsonl").write_text(json.dumps({"id": "x", "title": "X", "topic": "Sci", "text": "train"}) + "\n")
    assert load_text_rows(str(folder)) == rows
    assert [r["text"] for r in load_text_rows(str(folder), split="train")] == ["train"]
    with pytest.raises(FangError, match="no split 'validation'"):
        load_text_rows(str(folder), split="validation")

    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": "a b"}, {"text": ""}, {"text": "c"}])}).save_to_disk(str(saved))
    got = load_text_rows(str(saved))
    assert [(r["text"], r["topic"]) for r in got] == [("a b", "saved"), ("c", "saved")]

    single = tmp_path / "one.jsonl"
    single.write_text(json.dumps({"text": "solo"}) + "\n")
    assert load_text_rows(str(single))[0]["topic"] == "one"

    with pytest.raises(FangError, match="not found"):
        load_text_rows(str(tmp_path / "missing"))
    with pytest.raises(FangError, match="unknown hub corpus"):
        load_text_rows("hub:nope")


def test_wikitext_lines_become_articles():
    lines = ["", " = First = \n", "", " = = Section = = \n", " Body one . \n", " = Second = \n", " Body two . \n"]
    rows = _wikitext_articles(lines, "wikitext2")
    assert [r["title"] for r in rows] == ["First", "Second"]
    assert rows[0]["text"].startswith("= First =") and "Body one" in rows[0]["text"]
    assert {r["topic"] for r in rows} == {"wikitext2"}
