"""End to end: `dvc repro` of the real dvc.yaml on a tiny model and corpus, and what reruns after a change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers_project import BIAS_FILE, SWEEP_FILE, TOPICS, copy_project, dvc, stage_names


pytestmark = pytest.mark.slow  # dvc repro of the main job and both studies on a tiny project, many times


def repro(root: Path, *targets: str) -> set[str]:
    """Stages that `dvc repro` (default: the main pipeline only) actually ran."""
    return stage_names(dvc(root, "repro", *targets))


def repro_all(root: Path) -> set[str]:
    return repro(root) | repro(root, SWEEP_FILE) | repro(root, BIAS_FILE)


def planned(root: Path, *targets: str) -> set[str]:
    """Stages `dvc repro` would run, without running them: those whose own deps changed and, since a changed
    input changes every output after it, everything downstream of them (`--force-downstream`)."""
    return stage_names(dvc(root, "repro", "--dry", "--force-downstream", *targets))


def stale(root: Path) -> set[str]:
    """Stages `dvc status` reports as changed, across every dvc.yaml of the project."""
    out = dvc(root, "status")
    return {line.rstrip(":").rpartition(":")[2] for line in out.splitlines() if line and not line[0].isspace()
            and line.rstrip().endswith(":")}


@pytest.fixture(scope="module")
def project(main_job, tmp_path_factory) -> Path:
    """A copy of the session's tiny project, on which the main job has run once (conftest `main_job`)."""
    return copy_project(main_job[0], tmp_path_factory.mktemp("project") / "project")


def assert_ran(ran: set[str], must: set[str], may: set[str]) -> None:
    assert must <= ran <= may, f"ran {sorted(ran)}; must {sorted(must)}, may {sorted(may)}"


def edit_params(root: Path, block: str, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[block].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


SWEEP_METHODS = ("flap", "f_fang", "ica_fn_ranked", "gprune")
SWEEP_CELLS = {f"sweep_{stage}@{m}-0.3" for stage in ("prune", "evaluate") for m in SWEEP_METHODS}
SWEEP_INPUTS = {f"sweep_inputs@{m}" for m in SWEEP_METHODS}
SWEEP_ANALYSIS = {"ica", "gprune_modules"}  # the ICA maps and GPrune modules (seeds 003, 002) live with the sweep
SWEEP_ATTRIBUTED = {f"sweep_attribute@{m}-0.3" for m in SWEEP_METHODS}  # which topics' neurons each cell removed
# the attribution (a dense pass over the main calibration) lives with the sweep, whose report reads it
SWEEP = SWEEP_CELLS | SWEEP_INPUTS | {"sweep_dense", "report", "attribute"} | SWEEP_ANALYSIS | SWEEP_ATTRIBUTED
FANG_CELLS = {"sweep_prune@f_fang-0.3", "sweep_evaluate@f_fang-0.3", "sweep_attribute@f_fang-0.3"}
ANALYSIS = {"cluster", "taylor", "group", "allocate"}
BIAS_SOURCES = ("all", "Mathematics")
BIAS_ANALYSIS = {f"bias_{stage}@{src}" for stage in ANALYSIS for src in BIAS_SOURCES}
BIAS_SEED_ANALYSIS = {f"bias_{stage}@{src}" for stage in SWEEP_ANALYSIS for src in BIAS_SOURCES}  # per source too
BIAS_INPUTS = {f"bias_inputs@{src}-{m}" for src in BIAS_SOURCES for m in ("f_fang", "gprune")}
CELL_STAGES = ("prune", "evaluate", "attribute")  # attribute: which topics' neurons the cell removed
BIAS_CELLS = {f"bias_{stage}@{src}-f_fang-0.3" for stage in CELL_STAGES for src in BIAS_SOURCES}
BIAS_GPRUNE_CELLS = {f"bias_{stage}@{src}-gprune-0.3" for stage in CELL_STAGES for src in BIAS_SOURCES}
BIAS_RUNS = BIAS_INPUTS | BIAS_CELLS | {"bias_report"}
BIAS = ({f"bias_{stage}@{src}" for stage in ("calibrate", "capture") for src in BIAS_SOURCES} | BIAS_ANALYSIS | BIAS_RUNS
        | BIAS_SEED_ANALYSIS | BIAS_GPRUNE_CELLS)
MAIN = {"fetch_model", "fetch_data", "calibrate", "capture", "prune", "evaluate@dense", "evaluate@pruned", "summary"} | ANALYSIS


def test_repro_runs_the_main_job_then_the_studies_then_only_what_changed(project, main_job):
    assert main_job[1] == MAIN  # the plain `dvc repro` of a newcomer: no sweep, no bias study

    metrics = json.loads((project / "artifacts/metrics/pruned.json").read_text())
    prune = json.loads((project / "artifacts/metrics/prune.json").read_text())
    assert metrics["ppl"] > 1 and set(metrics["ppl_by_topic"]) == set(TOPICS)
    assert prune["method"] == "o_fang" and 0.1 < prune["achieved_sparsity"] < 0.45
    assert all(layer["shared_removed"] == 0 for layer in prune["layers"])
    assert (project / "artifacts/pruned/structure.json").exists()
    summary = json.loads((project / "artifacts/metrics/summary.json").read_text())
    assert summary["rows"]["perplexity"] == {"dense": json.loads((project / "artifacts/metrics/dense.json").read_text())["ppl"],
                                            "pruned": metrics["ppl"]}
    sizes = summary["rows"]["block parameters"]
    assert sizes["pruned"] < sizes["dense"] and summary["rows"]["decode tokens/s"]["pruned"] > 0
    assert "| perplexity |" in (project / "artifacts/summary.md").read_text()

    # the studies reuse the main artifacts: nothing of the main pipeline reruns
    assert repro(project, SWEEP_FILE) == SWEEP
    assert repro(project, BIAS_FILE) == BIAS
    for name in ("cluster.zarr", "taylor.zarr", "groups.zarr", "allocate.json", "report/results.md", "report/results.csv"):
        assert (project / "artifacts" / name).exists()
    report = (project / "artifacts/report/results.md").read_text()
    assert "| dense |" in report and "| f_fang | 30% |" in report and "| flap | 30% |" in report
    assert "| ica_fn_ranked | 30% |" in report and "| gprune | 30% |" in report
    assert "missing" not in report

    # the bias study: its own calibration per source, and a report with every run present
    bias = project / "artifacts/bias"
    assert json.loads((bias / "all/calib/calib.json").read_text())["n_samples"] == 3
    bias_md = (project / "artifacts/bias_report/bias.md").read_text()
    assert "| f_fang | Mathematics | 30% |" in bias_md and "missing" not in bias_md
    assert "| gprune | Mathematics | 30% |" in bias_md  # GPrune's sources there are shards of one topic
    assert (project / "artifacts/bias_report/bias_heatmap.png").stat().st_size > 1000
    # every cell was attributed (bias_attribute), so the report correlates removed neurons with lost topics
    assert "Does losing a topic's neurons predict losing the topic?" in bias_md
    assert (project / "artifacts/bias_report/attribution_correlation.png").stat().st_size > 1000

    assert repro_all(project) == set() and stale(project) == set()  # nothing changed, nothing reruns

    # prune.sparsity is the main job's: its prune reruns; the studies only rewrite their (unchanged) manifests
    edit_params(project, "prune", sparsity=0.2)
    assert repro(project) == {"prune", "evaluate@pruned", "summary"}
    assert repro(project, SWEEP_FILE) == SWEEP_INPUTS
    assert repro(project, BIAS_FILE) == BIAS_INPUTS

    # a FANG-only knob: after the manifests are rewritten, only FANG cells are stale, never flap's
    rewrite_manifests = (f"{SWEEP_FILE}:sweep_inputs", f"{BIAS_FILE}:bias_inputs")
    bias_fang_prunes = {f"bias_prune@{src}-f_fang-0.3" for src in BIAS_SOURCES}
    edit_params(project, "prune", tau=7.0)
    assert stale(project) == {"prune"} | SWEEP_INPUTS | BIAS_INPUTS
    assert repro(project, *rewrite_manifests) == SWEEP_INPUTS | BIAS_INPUTS
    assert stale(project) == {"prune", "sweep_prune@f_fang-0.3"} | bias_fang_prunes
    # an evaluation (and what follows) is skipped by DVC when the re-pruned model came out identical
    assert_ran(repro(project, SWEEP_FILE), {"sweep_prune@f_fang-0.3"}, FANG_CELLS | {"report"})
    assert_ran(repro(project), {"prune"}, {"prune", "evaluate@pruned", "summary"})
    assert_ran(repro(project, BIAS_FILE), bias_fang_prunes, BIAS_CELLS | {"bias_report"})

    # a key every method reads makes every cell's pruning stale, and nothing of the analysis
    edit_params(project, "prune", gqa="query_slot")
    repro(project, *rewrite_manifests)
    assert stale(project) == ({"prune"} | {f"sweep_prune@{m}-0.3" for m in SWEEP_METHODS} | bias_fang_prunes
                              | {f"bias_prune@{src}-gprune-0.3" for src in BIAS_SOURCES})
    edit_params(project, "prune", gqa="kv_group")
    repro(project, *rewrite_manifests)
    assert stale(project) == set()  # the manifests are back to what the cells ran with

    # the bias study's own keys rerun only the study: all of it, since its calibration changes every output
    # after it, so the plan says so without running it (the edit is then undone)
    edit_params(project, "bias", n_samples=4)
    assert repro(project) == set() and repro(project, SWEEP_FILE) == set()
    assert planned(project, BIAS_FILE) == BIAS
    edit_params(project, "bias", n_samples=3)
    assert stale(project) == set()

    # new clusters rerun the analysis and what reads it: FANG cells, not flap's, ICA's or GPrune's
    edit_params(project, "cluster", k=2)
    assert repro(project) == ANALYSIS | {"prune", "evaluate@pruned", "summary"}
    assert repro(project, SWEEP_FILE) == FANG_CELLS | SWEEP_INPUTS | {"report"}
    assert repro(project, BIAS_FILE) == BIAS_ANALYSIS | BIAS_RUNS

    # new ICA maps rerun only the ICA cells; GPrune's prune-time keys only GPrune's cells, not its modules
    edit_params(project, "ica", n_components=3)
    assert repro(project) == set()
    ica_cells = {"sweep_prune@ica_fn_ranked-0.3", "sweep_evaluate@ica_fn_ranked-0.3", "sweep_attribute@ica_fn_ranked-0.3",
                 "report"}
    assert_ran(repro(project, SWEEP_FILE), {"ica", "sweep_prune@ica_fn_ranked-0.3"} | SWEEP_INPUTS,
               {"ica"} | SWEEP_INPUTS | ica_cells)
    assert repro(project, BIAS_FILE) == {f"bias_ica@{src}" for src in BIAS_SOURCES} | BIAS_INPUTS
    edit_params(project, "gprune", module_gamma=0.5)
    gprune_sweep = {"sweep_prune@gprune-0.3", "sweep_evaluate@gprune-0.3", "sweep_attribute@gprune-0.3", "report"}
    assert_ran(repro(project, SWEEP_FILE), SWEEP_INPUTS | {"sweep_prune@gprune-0.3"}, SWEEP_INPUTS | gprune_sweep)
    gprune_prunes = {f"bias_prune@{src}-gprune-0.3" for src in BIAS_SOURCES}
    assert_ran(repro(project, BIAS_FILE), BIAS_INPUTS | gprune_prunes, BIAS_INPUTS | BIAS_GPRUNE_CELLS | {"bias_report"})

    # new calibration data: everything after calibration, flap cells included (they read the capture);
    # not the sweep's dense evaluation, which reads no calibration. The main job runs; for the studies,
    # where a new calibration changes every output downstream too, the plan is enough
    edit_params(project, "calibrate", seed=1)
    assert repro(project) == MAIN - {"fetch_model", "fetch_data", "evaluate@dense"}
    # (one plan for both studies: planned alone, the bias study would also list the sweep's `attribute`, which
    # its cells read and which a plan does not run)
    assert planned(project, SWEEP_FILE, BIAS_FILE) == (SWEEP - {"sweep_dense"}) | BIAS


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
