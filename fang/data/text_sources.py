"""Text corpora as article rows {id, title, topic, text}: the corpus `data.corpus` names (the embedded
wiki, a summaries JSON, a hub corpus such as WikiText-2, or a local Hugging Face dataset)."""

from __future__ import annotations

import re
from pathlib import Path

from ..core.errors import FangError, require
from .corpus import read_wiki_summaries
from .fetch import EMBEDDED_WIKI, embedded_wiki_json

HUB_TEXT_SOURCES = {
    # name -> (hub dataset id, config); "hub:wikitext2" is the standard WikiText-2 (raw) benchmark
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
}


def corpus_rows(source: str) -> list[dict]:
    """Rows of the corpus named by `data.corpus`: embedded wiki, a summaries JSON, or a hub/local HF dataset."""
    if source == EMBEDDED_WIKI:
        return read_wiki_summaries(embedded_wiki_json())
    if source.endswith(".json") and Path(source).is_file():
        return read_wiki_summaries(source)
    return load_text_rows(source)


def _wikitext_articles(lines: list[str], topic: str) -> list[dict]:
    """WikiText lines -> one row per article (split at top-level " = Title = " headings)."""
    rows: list[dict] = []
    title, buf = None, []

    def flush() -> None:
        text = "".join(buf).strip()
        if text:
            name = title or f"{topic}-{len(rows)}"
            rows.append({"id": f"{topic}:{len(rows)}", "title": name, "topic": topic, "text": text})

    for line in lines:
        m = re.fullmatch(r" = ([^=].*?) = \n?", line)
        if m:
            flush()
            title, buf = m.group(1), [line]
        else:
            buf.append(line)
    flush()
    return rows


def _rows_from_dataset(ds, topic: str) -> list[dict]:
    require("text" in ds.column_names, f"dataset {topic!r} has no 'text' column (columns: {ds.column_names})")
    rows = []
    for i, ex in enumerate(ds):
        text = (ex.get("text") or "").strip()
        if not text:
            continue
        rows.append(
            {
                "id": str(ex.get("id", i)),
                "title": str(ex.get("title", ex.get("id", i))),
                "topic": str(ex.get("topic") or topic),
                "text": text,
            }
        )
    return rows


def _pick_split(dsd, split: str, source: str):
    if split in dsd:
        return dsd[split]
    if len(dsd) == 1:
        return next(iter(dsd.values()))
    raise FangError(f"dataset {source} has no split {split!r}; it has {', '.join(dsd)}")


def load_text_rows(source: str, split: str = "test") -> list[dict]:
    """Rows {id, title, topic, text} from a hub corpus or a local dataset.

    * ``hub:wikitext2``: WikiText-2 raw, `split` (default test), one row per article, topic
      "wikitext2" (needs the network or a populated HF cache);
    * a folder written by ``Dataset(Dict).save_to_disk``;
    * a folder of data files (jsonl/json/csv/parquet/txt) that ``datasets.load_dataset`` reads,
      or a single .jsonl/.json file. A missing "topic" column becomes the folder/file name.
    """
    import datasets

    if source.startswith("hub:"):
        name = source[4:]
        if name not in HUB_TEXT_SOURCES:
            raise FangError(f"unknown hub corpus {source!r}; known: {', '.join('hub:' + k for k in HUB_TEXT_SOURCES)}")
        path, config = HUB_TEXT_SOURCES[name]
        try:
            ds = datasets.load_dataset(path, config, split=split)
        except Exception as exc:  # noqa: BLE001 - network/cache failures come in many types
            raise FangError(f"could not load {source} ({path}/{config}, split {split}): {str(exc).splitlines()[0]}") from None
        return _wikitext_articles(list(ds["text"]), name)

    path = Path(source).expanduser()
    if not path.exists():
        raise FangError(f"text corpus not found: {source!r} (give hub:wikitext2, a dataset folder or a .jsonl file)")
    topic = path.stem if path.is_file() else path.name
    if path.is_file():
        require(path.suffix in (".jsonl", ".json"), f"text corpus file {path} must be .jsonl or .json")
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
        return _rows_from_dataset(ds, topic)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = datasets.load_from_disk(str(path))
        ds = loaded if isinstance(loaded, datasets.Dataset) else _pick_split(loaded, split, source)
        return _rows_from_dataset(ds, topic)
    try:
        dsd = datasets.load_dataset(str(path))
    except Exception as exc:  # noqa: BLE001
        raise FangError(f"could not read a dataset from folder {path}: {str(exc).splitlines()[0]}") from None
    return _rows_from_dataset(_pick_split(dsd, split, source), topic)
