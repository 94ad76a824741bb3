"""End to end: `dvc repro` of the real dvc.yaml on a tiny model and corpus, and what reruns after a change."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_model
from helpers_tokenizer import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ("People", "Geography", "Mathematics")


def write_corpus(path: Path) -> None:
    words = {"People": "born king poet queen painter", "Geography": "river mountain city coast lake",
             "Mathematics": "number prime proof theorem graph"}
    arts = {}
    for t in TOPICS:
        vocab = words[t].split()
        for i in range(24):
            sents = [f"The {vocab[(i + j) % 5]} {j} is {vocab[(i * j) % 5]}." for j in range(4)]
            arts[f"{t} {i}"] = {"title": f"{t} {i}", "extract": " ".join(sents), "topic": t}
    path.write_text(json.dumps(arts))


def write_bigbench(folder: Path) -> None:
    task = folder / "tiny_mc"
    task.mkdir(parents=True)
    examples = [{"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1)}} for i in range(12)]
    (task / "task.json").write_text(json.dumps({"name": "tiny_mc", "description": "parity", "examples": examples}))


def tiny_params(root: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["name"] = str(root / "tiny_model")
    params["data"].update(corpus=str(root / "summaries.json"), bigbench=str(root / "bigbench"),
                          tasks=["tiny_mc", "next_sentence"], next_sentence_per_topic=4, test_fraction=0.3)
    params["calibrate"].update(n_samples=4, seq_len=32)
    params["capture"]["batch_size"] = 2
    params["prune"].update(sparsity=0.3, batch_size=2)
    params["evaluate"].update(ppl_seq_len=32, ppl_max_windows_per_topic=2, task_limit=4, batch_size=4)
    params["cluster"].update(k=3, pca_dim=8)
    params["taylor"]["batch_size"] = 2
    params["sweep"].update(methods=["f_fang"], sparsities=[0.3])
    params["bias"].update(sources=["all", "Mathematics"], n_samples=3, seq_len=32, methods=["f_fang"], sparsities=[0.3])
    params["ica"].update(n_components=4, n_restarts=1)
    params["gprune"].update(min_source_tokens=16, n_modules=3)
    return params


def dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "FANG_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    proc = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def repro(root: Path) -> set[str]:
    """Stages that `dvc repro` actually ran."""
    return set(re.findall(r"Running stage '([^']+)'", dvc(root, "repro")))


def planned(root: Path) -> set[str]:
    """Stages `dvc repro --dry` would run (downstream of a change included)."""
    return set(re.findall(r"Running stage '([^']+)'", dvc(root, "repro", "--dry")))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    for name in ("fang", "stages"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    model = tiny_model(6, 3, layers=3)
    model.save_pretrained(root / "tiny_model")
    tiny_tokenizer().save_pretrained(root / "tiny_model")
    write_corpus(root / "summaries.json")
    write_bigbench(root / "bigbench")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(root)))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    return root


def edit_params(root: Path, block: str, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[block].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


SWEEP = {"sweep_prune@f_fang-0.3", "sweep_evaluate@f_fang-0.3", "report"}
ANALYSIS = {"cluster", "taylor", "group", "allocate"}
BIAS_SOURCES = ("all", "Mathematics")
BIAS_ANALYSIS = {f"bias_{stage}@{src}" for stage in ANALYSIS for src in BIAS_SOURCES}
BIAS_RUNS = {f"bias_{stage}@{src}-f_fang-0.3" for stage in ("prune", "evaluate") for src in BIAS_SOURCES} | {"bias_report"}
BIAS = {f"bias_{stage}@{src}" for stage in ("calibrate", "capture") for src in BIAS_SOURCES} | BIAS_ANALYSIS | BIAS_RUNS
ALL_STAGES = (
    {"fetch_model", "fetch_data", "calibrate", "capture", "prune", "evaluate@dense", "evaluate@pruned"}
    | ANALYSIS | SWEEP | BIAS | {"ica", "gprune_modules"}
)


def test_repro_runs_everything_then_only_what_changed(project):
    assert repro(project) == ALL_STAGES

    metrics = json.loads((project / "artifacts/metrics/pruned.json").read_text())
    prune = json.loads((project / "artifacts/metrics/prune.json").read_text())
    assert metrics["ppl"] > 1 and set(metrics["ppl_by_topic"]) == set(TOPICS)
    assert 0.15 < prune["achieved_sparsity"] < 0.45
    assert (project / "artifacts/pruned/structure.json").exists()

    for name in ("cluster.zarr", "taylor.zarr", "groups.zarr", "allocate.json", "report/results.md", "report/results.csv"):
        assert (project / "artifacts" / name).exists()
    report = (project / "artifacts/report/results.md").read_text()
    assert "| dense |" in report and "| f_fang | 30% |" in report and "missing" not in report

    # the bias study: its own calibration per source, and a report with every run present
    bias = project / "artifacts/bias"
    assert json.loads((bias / "all/calib/calib.json").read_text())["n_samples"] == 3
    bias_md = (project / "artifacts/bias_report/bias.md").read_text()
    assert "| f_fang | Mathematics | 30% |" in bias_md and "missing" not in bias_md
    assert (project / "artifacts/bias_report/bias_heatmap.png").stat().st_size > 1000

    assert repro(project) == set()  # nothing changed, nothing reruns

    # the analysis artifacts and the sweep do not depend on prune.sparsity: only the single prune reruns
    edit_params(project, "prune", sparsity=0.2)
    assert repro(project) == {"prune", "evaluate@pruned"}

    # a pruning key makes the pruning stages stale, not the analysis (--dry cannot see past their outputs)
    bias_prunes = {f"bias_prune@{src}-f_fang-0.3" for src in BIAS_SOURCES}
    edit_params(project, "prune", gqa="query_slot")
    assert planned(project) == {"prune", "sweep_prune@f_fang-0.3"} | bias_prunes
    edit_params(project, "prune", gqa="kv_group")

    # FANG on the same analysis artifacts: only prune and its evaluation rerun
    edit_params(project, "prune", method="o_fang")
    assert repro(project) == {"prune", "evaluate@pruned"}
    prune = json.loads((project / "artifacts/metrics/prune.json").read_text())
    assert prune["method"] == "o_fang" and 0.1 < prune["achieved_sparsity"] < 0.35
    assert all(layer["shared_removed"] == 0 for layer in prune["layers"])

    # a FANG knob reruns the pruning that reads it, never the analysis
    edit_params(project, "prune", tau=7.0)
    assert planned(project) == {"prune", "sweep_prune@f_fang-0.3"} | bias_prunes
    edit_params(project, "prune", tau=9.0)

    # the bias study's own keys rerun only the study
    edit_params(project, "bias", n_samples=4)
    assert repro(project) == BIAS

    edit_params(project, "cluster", k=2)
    assert repro(project) == ANALYSIS | SWEEP | {"prune", "evaluate@pruned"} | BIAS_ANALYSIS | BIAS_RUNS

    edit_params(project, "calibrate", seed=1)
    assert repro(project) == ({"calibrate", "capture", "prune", "evaluate@pruned", "ica", "gprune_modules"}
                              | ANALYSIS | SWEEP | BIAS)


def test_bias_calibration_is_one_topic_and_disjoint_from_its_evaluation(project):
    """A single-topic source samples only that topic's training articles; ID/OOD perplexity uses test articles."""
    calib = json.loads((project / "artifacts/bias/Mathematics/calib/calib.json").read_text())
    assert calib["topics_filter"] == ["Mathematics"] and set(calib["articles_per_topic"]) == {"Mathematics"}
    train = {json.loads(line)["id"]: json.loads(line)["topic"]
             for line in (project / "artifacts/data/train.jsonl").read_text().splitlines()}
    used = {a for window in calib["window_articles"] for a in window}
    assert used and all(train[a] == "Mathematics" for a in used)
    test_ids = {json.loads(line)["id"] for line in (project / "artifacts/data/test.jsonl").read_text().splitlines()}
    assert not used & test_ids  # in-distribution perplexity is measured on articles never calibrated on
    everything = json.loads((project / "artifacts/bias/all/calib/calib.json").read_text())
    # "all" samples the whole training split (a handful of tiny windows may still land in one topic)
    assert everything["topics_filter"] == [] and {a for w in everything["window_articles"] for a in w} <= set(train)


def test_bias_report_names_a_failed_run(project, tmp_path):
    cell = project / "artifacts/bias_sweep/Mathematics/f_fang-0.3.metrics.json"
    kept = tmp_path / "kept.json"
    shutil.move(cell, kept)
    try:
        env = {**os.environ, "FANG_NO_PROGRESS": "1"}
        proc = subprocess.run([sys.executable, "-m", "fang.cli", "bias-report"], cwd=project, capture_output=True,
                              text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "missing: f_fang / Mathematics" in (proc.stdout + proc.stderr).replace("\n", " ")
        md = (project / "artifacts/bias_report/bias.md").read_text()
        assert "**Missing runs**" in md and "f_fang / Mathematics / 30%" in md
        assert "| f_fang | all | 30% |" in md  # the runs that exist are still reported
    finally:
        shutil.move(kept, cell)


def test_cli_errors_are_one_line_without_traceback(project, tmp_path):
    def fang(*args, cwd=project):
        return subprocess.run([sys.executable, "-m", "fang.cli", *args], cwd=cwd, capture_output=True, text=True)

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"prune": {"sparsity": 1.0}}))
    proc = fang("prune", "--params", str(bad))
    assert proc.returncode == 2 and "prune.sparsity=1.0 is out of range" in proc.stderr and "Traceback" not in proc.stderr

    bad.write_text(yaml.safe_dump({"model": {"name": str(tmp_path / "no_such_model")}}))
    proc = fang("fetch-model", "--params", str(bad))
    assert proc.returncode == 2 and "model path not found" in proc.stderr and "Traceback" not in proc.stderr

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["tasks"] = ["no_such_task"]
    bad.write_text(yaml.safe_dump(params))
    proc = fang("fetch-data", "--params", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and "no_such_task" in proc.stderr and "Traceback" not in proc.stderr

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["calibrate"].update(n_samples=1000, seq_len=256)
    bad.write_text(yaml.safe_dump(params))
    proc = fang("calibrate", "--params", str(bad))
    assert proc.returncode == 2 and "corpus too small" in proc.stderr and "Traceback" not in proc.stderr
