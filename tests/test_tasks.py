"""Task-folder construction: BIG-bench conversion, next-sentence task, manifest, sources."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

from fang.core.errors import FangError
from fang.data import bigbench, next_sentence, tasks


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


MC_A = {
    "name": "mc_a",
    "description": "pick the colour",
    "task_prefix": "Answer {{carefully}}.",  # jinja syntax in a prefix must stay literal
    "example_output_prefix": "\nAnswer: ",
    "examples": [
        {"input": f"What colour is thing {i}? ", "target_scores": {"red": int(i % 3 == 0), "green": int(i % 3 == 1), "blue": int(i % 3 == 2)}}
        for i in range(9)
    ],
}
MC_B = {
    "name": "mc_b",
    "append_choices_to_input": False,
    "example_input_prefix": "",
    "example_output_prefix": "\nThis is ",
    "examples": [
        {"input": "Ice is cold.", "target_scores": {"true": 1, "false": 0}},
        {"input": "Fire is cold.", "target_scores": {"true": 0, "false": 1}},
        {"input": "Both apply.", "target_scores": {"true": 1, "false": 1}},  # a tie: both count as correct
        {"input": "Neither.", "target_scores": {"true": 0, "false": 0}},  # no answer: skipped
    ],
}
GEN_C = {"name": "gen_c", "examples": [{"input": "2+2=", "target": "4"}]}


@pytest.fixture
def bb_dir(tmp_path) -> Path:
    root = tmp_path / "bb" / "benchmark_tasks"
    _write(root / "mc_a" / "task.json", MC_A)
    _write(root / "mc_b" / "task.json", MC_B)
    _write(root / "gen_c" / "task.json", GEN_C)
    _write(root / "sub_d" / "task.json", {"name": "sub_d", "description": "has subtasks"})
    _write(root / "sub_d" / "one" / "task.json", {**MC_B, "name": "sub_d:one"})
    return root


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _articles() -> list[dict]:
    rows = []
    for topic in ("People", "Arts & Crafts"):
        for i in range(6):
            rows.append(
                {
                    "id": f"{topic}-{i}",
                    "title": f"{topic} {i}",
                    "topic": topic,
                    "text": f"Item {i} of {topic} is a thing. It has property number {i} in {topic}. More text here.",
                }
            )
        rows.append({"id": f"{topic}-short", "title": "short", "topic": topic, "text": "Only one sentence here."})
    return rows


def test_task_names_folder_and_tarball(bb_dir, tmp_path):
    assert bigbench.bigbench_task_names(str(bb_dir)) == ["mc_a", "mc_b", "sub_d/one"]
    # the parent of benchmark_tasks is accepted too
    assert bigbench.bigbench_task_names(str(bb_dir.parent)) == ["mc_a", "mc_b", "sub_d/one"]
    tarball = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        tf.add(bb_dir, arcname="bigbench-1.0.0/bigbench/benchmark_tasks")
    src = bigbench.read_bigbench_source(str(tarball))
    assert src.kind == "tarball"
    assert bigbench.bigbench_task_names(src) == ["mc_a", "mc_b", "sub_d/one"]
    found, every = src.read(["mc_b", "nope"])
    assert list(found) == ["mc_b"] and found["mc_b"]["name"] == "mc_b"
    assert "gen_c" in every and "nope" not in every


def test_embedded_bigbench_is_gone_with_a_way_out():
    # bigbench==1.0.0 is no longer served: the old default says so and names what to give instead
    with pytest.raises(FangError, match=r"no longer serves bigbench==1\.0\.0.*data\.bigbench to a local folder"):
        bigbench.read_bigbench_source("embedded:bigbench")


def test_bigbench_task_without_a_bigbench_source_says_which_param(tmp_path):
    with pytest.raises(FangError, match=r"unknown evaluation task 'winowhy'.*data\.bigbench"):
        tasks.build_task_folder(["boolq", "winowhy"], None, None, tmp_path / "t")
    with pytest.raises(FangError, match=r"'hellaswg' .*did you mean hellaswag"):
        tasks.build_task_folder(["hellaswg"], None, None, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_bad_sources(tmp_path):
    with pytest.raises(FangError, match="not found"):
        bigbench.read_bigbench_source(str(tmp_path / "missing"))
    with pytest.raises(FangError, match="no <task>/task.json"):
        bigbench.read_bigbench_source(str(tmp_path))


def test_build_bigbench_task_files(bb_dir, tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.utils import apply_template

    out = tmp_path / "out"
    yaml_path = bigbench.build_bigbench_task(bb_dir / "mc_a" / "task.json", out, "mc_a", seed=1)
    assert yaml_path == out / "bb_mc_a.yaml"
    rows = _rows(out / "bb_mc_a.jsonl")
    assert len(rows) == 9
    by_question = {ex["input"].strip(): ex["target_scores"] for ex in MC_A["examples"]}
    for row in rows:
        scores = by_question[row["question"]]
        assert sorted(row["choices"]) == sorted(scores)
        assert scores[row["choices"][row["label"]]] == 1 and row["gold"] == [row["label"]]
    # examples are shuffled deterministically (so `limit` takes a random subset)
    assert [r["question"] for r in rows] != [ex["input"].strip() for ex in MC_A["examples"]]
    bigbench.build_bigbench_task(bb_dir / "mc_a" / "task.json", tmp_path / "again", "mc_a", seed=1)
    assert _rows(tmp_path / "again" / "bb_mc_a.jsonl") == rows

    cfg = load_yaml(yaml_path, resolve_func=True)
    assert cfg["task"] == "bb_mc_a" and cfg["output_type"] == "multiple_choice"
    assert cfg["dataset_path"] == "json" and cfg["dataset_kwargs"] == {"data_files": {"test": "bb_mc_a.jsonl"}}
    assert cfg["test_split"] == "test" and cfg["num_fewshot"] == 0
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc", "acc_norm"]
    assert all(m["aggregation"] == "mean" and m["higher_is_better"] is True for m in cfg["metric_list"])
    assert (cfg["doc_to_choice"], cfg["doc_to_target"], cfg["target_delimiter"]) == ("choices", "label", " ")
    doc = rows[0]
    text = apply_template(cfg["doc_to_text"], doc)
    choices = "".join(f"\n  choice: {c}" for c in doc["choices"])
    assert text == f"Answer {{{{carefully}}}}.\nQ: {doc['question']}{choices}\nAnswer:"


def test_yaml_dataset_is_relocatable(bb_dir, tmp_path, monkeypatch):
    from lm_eval.tasks._yaml_loader import load_yaml

    bigbench.build_bigbench_task(bb_dir / "mc_b" / "task.json", tmp_path / "a", "mc_b")
    moved = tmp_path / "elsewhere" / "tasks"
    shutil.move(str(tmp_path / "a"), moved)
    monkeypatch.chdir(tmp_path)  # neither the folder nor its parent
    cfg = load_yaml(moved / "bb_mc_b.yaml", resolve_func=True)
    ds = cfg["custom_dataset"](**cfg["dataset_kwargs"], version=1.0)
    assert ds["test"].num_rows == 3  # the all-zero example was skipped
    assert set(ds["test"].column_names) >= {"question", "choices", "label", "gold"}


def test_prompt_without_choices_and_ties(bb_dir, tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.utils import apply_template

    path = bigbench.build_bigbench_task(bb_dir / "mc_b" / "task.json", tmp_path, "mc_b")
    cfg = load_yaml(path, resolve_func=False)
    assert cfg["doc_to_target"] == "gold"  # a tie exists: any best choice counts
    rows = _rows(tmp_path / "bb_mc_b.jsonl")
    tie = next(r for r in rows if r["question"] == "Both apply.")
    assert sorted(tie["gold"]) == [0, 1]
    assert apply_template(cfg["doc_to_text"], tie) == "Both apply.\nThis is"


def test_generative_and_subtask_folders_rejected(bb_dir, tmp_path):
    with pytest.raises(FangError, match="gen_c.*not multiple choice"):
        bigbench.build_bigbench_task(bb_dir / "gen_c" / "task.json", tmp_path, "gen_c")
    with pytest.raises(FangError, match=r"folder of subtasks.*sub_d/<subtask>.*e.g. sub_d/one"):
        tasks.build_task_folder(["sub_d"], str(bb_dir), None, tmp_path / "t")
    with pytest.raises(FangError, match="not multiple choice"):
        tasks.build_task_folder(["gen_c"], str(bb_dir), None, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_unknown_task_error_names_it(bb_dir, tmp_path):
    with pytest.raises(FangError, match=r"unknown evaluation task 'mc_aa'.*did you mean mc_a"):
        tasks.build_task_folder(["mc_a", "mc_aa"], str(bb_dir), None, tmp_path / "t")


def test_task_folder_manifest(bb_dir, tmp_path):
    out = tmp_path / "tasks"
    manifest = tasks.build_task_folder(["mc_a", "sub_d/one", "boolq", "next_sentence"], str(bb_dir), _articles(), out, 3, 0)
    assert json.loads((out / "tasks.json").read_text()) == manifest
    by_name = {e["name"]: e for e in manifest["tasks"]}
    assert list(by_name) == ["mc_a", "sub_d/one", "boolq", "next_sentence"]
    a = by_name["mc_a"]
    assert (a["kind"], a["lm_eval_tasks"], a["n_examples"], a["n_choices"]) == ("bigbench", ["bb_mc_a"], 9, [3])
    assert a["chance_acc"] == pytest.approx(1 / 3)
    d = by_name["sub_d/one"]
    assert d["lm_eval_tasks"] == ["bb_sub_d_one"] and d["n_examples"] == 3
    assert d["chance_acc"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)  # the tie is always right
    assert by_name["boolq"]["kind"] == "hub" and by_name["boolq"]["n_examples"] is None
    assert not list(out.glob("*boolq*"))
    ns = by_name["next_sentence"]
    assert ns["lm_eval_tasks"] == ["next_sentence"] and ns["n_examples"] == 6 and ns["chance_acc"] == 0.25
    assert sorted(ns["subtasks"]) == ["next_sentence_arts_crafts", "next_sentence_people"]
    assert sorted(p.name for p in out.glob("*.yaml")) == [
        "bb_mc_a.yaml", "bb_sub_d_one.yaml", "next_sentence.yaml",
        "next_sentence_arts_crafts.yaml", "next_sentence_people.yaml",
    ]  # fmt: skip
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tasks.tmp")]


def test_next_sentence_construction(tmp_path):
    rows = _articles()
    names = next_sentence.build_next_sentence_task(rows, tmp_path / "a", per_topic=4, seed=0)
    assert names == ["next_sentence", "next_sentence_arts_crafts", "next_sentence_people"]
    group = yaml.safe_load((tmp_path / "a" / "next_sentence.yaml").read_text())
    assert group["group"] == "next_sentence" and group["task"] == names[1:]
    assert [m["metric"] for m in group["aggregate_metric_list"]] == ["acc", "acc_norm"]
    second = {r["id"]: next_sentence.split_sentences(r["text"])[1] for r in rows if r["id"][-1].isdigit()}
    topic_of = {r["id"]: r["topic"] for r in rows}
    for name in names[1:]:
        examples = _rows(tmp_path / "a" / f"{name}.jsonl")
        assert len(examples) == 4
        for ex in examples:
            assert not ex["id"].endswith("short")
            assert ex["context"] == next_sentence.split_sentences(next(r["text"] for r in rows if r["id"] == ex["id"]))[0]
            assert len(ex["choices"]) == 4 and len(set(ex["choices"])) == 4
            assert ex["choices"].count(second[ex["id"]]) == 1
            assert ex["choices"][ex["label"]] == second[ex["id"]] and ex["gold"] == [ex["label"]]
            assert ex["id"] not in ex["distractor_ids"] and len(set(ex["distractor_ids"])) == 3
            distractors = [c for i, c in enumerate(ex["choices"]) if i != ex["label"]]
            for did, text in zip(ex["distractor_ids"], distractors):
                assert topic_of[did] == ex["topic"] and second[did] == text
    # deterministic for a seed, whatever the row order; a different seed changes the draw
    next_sentence.build_next_sentence_task(list(reversed(rows)), tmp_path / "b", per_topic=4, seed=0)
    next_sentence.build_next_sentence_task(rows, tmp_path / "c", per_topic=4, seed=1)
    same = _rows(tmp_path / "a" / "next_sentence_people.jsonl") == _rows(tmp_path / "b" / "next_sentence_people.jsonl")
    other = _rows(tmp_path / "a" / "next_sentence_people.jsonl") == _rows(tmp_path / "c" / "next_sentence_people.jsonl")
    assert same and not other


def test_next_sentence_needs_four_articles(tmp_path):
    rows = [r for r in _articles() if r["topic"] == "People"][:3]
    with pytest.raises(FangError, match="next-sentence"):
        next_sentence.build_next_sentence_task(rows, tmp_path, per_topic=4, seed=0)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The U.S. Army is big. It was founded in 1775.", ["The U.S. Army is big.", "It was founded in 1775."]),
        ("Dr. Smith met St. John, e.g. Mr. Jones. Then they left!", ["Dr. Smith met St. John, e.g. Mr. Jones.", "Then they left!"]),
        ("John F. Kennedy was born c. 1917. He died in 1963.", ["John F. Kennedy was born c. 1917.", "He died in 1963."]),
        ('He said "stop." Then she went. Why? Because.', ['He said "stop."', "Then she went.", "Why?", "Because."]),
        ("Version 2.5 was out. A line\nnew paragraph here", ["Version 2.5 was out.", "A line", "new paragraph here"]),
        ("lower case after a period. stays together", ["lower case after a period. stays together"]),
    ],
)
def test_split_sentences(text, expected):
    assert next_sentence.split_sentences(text) == expected


def test_topic_slug():
    assert next_sentence.topic_slug("Society and social sciences") == "society_and_social_sciences"
    assert next_sentence.topic_slug("Arts & Crafts") == "arts_crafts"


def test_atomic_folder_replaced(bb_dir, tmp_path):
    out = tmp_path / "tasks"
    out.mkdir()
    (out / "stale.yaml").write_text("task: stale\n")
    tasks.build_task_folder(["mc_a"], str(bb_dir), None, out)
    assert not (out / "stale.yaml").exists() and (out / "bb_mc_a.yaml").exists()
    assert os.access(out / "_fang_data.py", os.R_OK)
