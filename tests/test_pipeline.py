"""End to end: `dvc repro` of the real dvc.yaml on a tiny model and corpus, and what reruns after a change."""

from __future__ import annotations

import json
import signal
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
def studied(main_job, tmp_path_factory) -> tuple[Path, set[str], set[str]]:
    """A copy of the session's tiny project (conftest `main_job`: the main job has run once) on which both studies
    then ran: (root, stages the sweep's `dvc repro` ran, stages the bias study's ran)."""
    root = copy_project(main_job[0], tmp_path_factory.mktemp("studied") / "project")
    return root, repro(root, SWEEP_FILE), repro(root, BIAS_FILE)


@pytest.fixture
def project(studied, tmp_path) -> Path:
    """A throwaway copy of the studied project (a few MB), for a test that changes params: each test starts from
    the same up-to-date state instead of undoing the last test's edits."""
    return copy_project(studied[0], tmp_path / "project")


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


MANIFESTS = (f"{SWEEP_FILE}:sweep_inputs", f"{BIAS_FILE}:bias_inputs")  # every method manifest of both studies
ALL_INPUTS = SWEEP_INPUTS | BIAS_INPUTS
BIAS_FANG_PRUNES = {f"bias_prune@{src}-f_fang-0.3" for src in BIAS_SOURCES}
BIAS_GPRUNE_PRUNES = {f"bias_prune@{src}-gprune-0.3" for src in BIAS_SOURCES}

# What reruns after a change is checked in two steps, without running a cell. A cell's deps name its method's
# manifest (`fang method-inputs`: the keys and analysis hashes that method reads), so the manifests are rewritten
# for real (`repro(project, *MANIFESTS)`, which first runs whatever analysis they hash), then `dvc status` says
# which cells' manifests came out different, and `dvc repro --dry --force-downstream` what would run after them.
# Each test works on its own copy of the studied project (`project`). The main job's own rerun after a prune key
# is run for real by test_dvc_sharing.py's queued experiments (prune, evaluate@pruned, summary and nothing else).


def test_repro_runs_the_main_job_then_the_studies_and_then_nothing(studied, main_job):
    project, ran_sweep, ran_bias = studied
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
    assert ran_sweep == SWEEP
    assert ran_bias == BIAS
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


def test_the_main_jobs_sparsity_reruns_its_prune_and_only_rewrites_the_studies_manifests(project):
    edit_params(project, "prune", sparsity=0.2)
    assert planned(project) == {"prune", "evaluate@pruned", "summary"}
    assert repro(project, *MANIFESTS) == ALL_INPUTS
    assert stale(project) == {"prune"}  # every manifest came out unchanged: no cell of either study is stale


def test_a_fang_only_key_makes_only_fang_cells_stale(project):
    edit_params(project, "prune", tau=7.0)
    assert stale(project) == {"prune"} | ALL_INPUTS
    assert repro(project, *MANIFESTS) == ALL_INPUTS
    assert stale(project) == {"prune", "sweep_prune@f_fang-0.3"} | BIAS_FANG_PRUNES  # never flap's, ICA's or GPrune's
    assert planned(project, SWEEP_FILE, BIAS_FILE) == FANG_CELLS | {"report"} | BIAS_CELLS | {"bias_report"}


def test_a_key_every_method_reads_makes_every_cells_pruning_stale_and_nothing_of_the_analysis(project):
    edit_params(project, "prune", gqa="query_slot")
    assert repro(project, *MANIFESTS) == ALL_INPUTS
    assert stale(project) == ({"prune"} | {f"sweep_prune@{m}-0.3" for m in SWEEP_METHODS} | BIAS_FANG_PRUNES
                              | BIAS_GPRUNE_PRUNES)
    edit_params(project, "prune", gqa="kv_group")
    repro(project, *MANIFESTS)  # (DVC's run cache may restore them instead of running them: they ran with these params)
    assert stale(project) == set()  # the manifests are back to what the cells ran with


def test_the_bias_studys_own_keys_rerun_only_the_study(project):
    # all of it, since its calibration changes every output after it: the plan says so without running it
    edit_params(project, "bias", n_samples=4)
    assert repro(project) == set() and repro(project, SWEEP_FILE) == set()
    assert planned(project, BIAS_FILE) == BIAS
    edit_params(project, "bias", n_samples=3)
    assert stale(project) == set()


def test_new_clusters_rerun_the_analysis_and_what_reads_it_fang_cells_only(project):
    edit_params(project, "cluster", k=2)
    assert planned(project) == ANALYSIS | {"prune", "evaluate@pruned", "summary"}
    # the manifests hash the analysis they name: rewriting them runs the main and each source's analysis first
    assert repro(project, *MANIFESTS) == ANALYSIS | BIAS_ANALYSIS | ALL_INPUTS
    # FANG cells, not flap's, ICA's or GPrune's (which read no clusters)
    assert stale(project) == {"prune", "sweep_prune@f_fang-0.3"} | BIAS_FANG_PRUNES
    assert planned(project, SWEEP_FILE, BIAS_FILE) == FANG_CELLS | {"report"} | BIAS_CELLS | {"bias_report"}


def test_new_ica_maps_rerun_only_the_ica_cells(project):
    edit_params(project, "ica", n_components=3)
    assert repro(project) == set()
    ica_maps = {"ica"} | {f"bias_ica@{src}" for src in BIAS_SOURCES}
    assert repro(project, *MANIFESTS) == ica_maps | ALL_INPUTS
    assert stale(project) == {"sweep_prune@ica_fn_ranked-0.3"}
    ica_cells = {f"sweep_{stage}@ica_fn_ranked-0.3" for stage in ("prune", "evaluate", "attribute")} | {"report"}
    assert planned(project, SWEEP_FILE) == ica_cells


def test_gprunes_prune_time_keys_rerun_only_gprune_cells_not_its_modules(project):
    edit_params(project, "gprune", module_gamma=0.5)
    assert repro(project, *MANIFESTS) == ALL_INPUTS  # neither `gprune_modules` nor `bias_gprune_modules`
    assert stale(project) == {"sweep_prune@gprune-0.3"} | BIAS_GPRUNE_PRUNES
    gprune_sweep = {f"sweep_{stage}@gprune-0.3" for stage in ("prune", "evaluate", "attribute")} | {"report"}
    assert planned(project, SWEEP_FILE, BIAS_FILE) == gprune_sweep | BIAS_GPRUNE_CELLS | {"bias_report"}


def test_new_calibration_data_reruns_everything_after_calibration(project):
    # flap cells included (they read the capture); not the dense evaluations, which read no calibration.
    # A new calibration changes every output downstream of it, so the plan is the answer
    edit_params(project, "calibrate", seed=1)
    after_calibration = MAIN - {"fetch_model", "fetch_data", "evaluate@dense"}
    assert planned(project) == after_calibration
    # (one plan for both studies: planned alone, the bias study would also list the sweep's `attribute`, which
    # its cells read and which a plan does not run; the main job's stages the studies read are planned with them)
    studies_read = {"calibrate", "capture"} | ANALYSIS
    assert planned(project, SWEEP_FILE, BIAS_FILE) == studies_read | (SWEEP - {"sweep_dense"}) | BIAS


def test_bias_calibration_is_one_topic_and_disjoint_from_its_evaluation(studied):
    """A single-topic source samples only that topic's training articles; ID/OOD perplexity uses test articles."""
    project = studied[0]
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


def fang_in_process(argv: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """`fang <argv>` run by the CLI's own `main` in this process (as `python -m fang.cli` runs it, without a
    fresh interpreter): its exit status and everything it printed. An exception other than an exit escapes."""
    from fang.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    sigterm = signal.getsignal(signal.SIGTERM)  # main() makes SIGTERM an interrupt; not pytest's
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_bias_report_names_a_failed_run(project, monkeypatch, capsys):
    (project / "artifacts/bias_sweep/Mathematics/f_fang-0.3.metrics.json").unlink()
    code, printed = fang_in_process(["bias-report"], project, monkeypatch, capsys)
    assert code == 0, printed
    assert "missing: f_fang / Mathematics" in printed.replace("\n", " ")
    md = (project / "artifacts/bias_report/bias.md").read_text()
    assert "**Missing runs**" in md and "f_fang / Mathematics / 30%" in md
    assert "| f_fang | all | 30% |" in md  # the runs that exist are still reported


def test_cli_errors_are_one_line_without_traceback(project, tmp_path, monkeypatch, capsys):
    """(Also through a real `python -m fang.cli` per case, with every other kind of bad input, in
    tests/test_badinput_sweep.py: sparsity_one, model_path_missing, data_task_unknown, n_samples_too_many.)"""
    def fang(*args, cwd=project):
        code, printed = fang_in_process(list(args), cwd, monkeypatch, capsys)
        lines = [line for line in printed.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in printed, printed
        return lines[0]

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"prune": {"sparsity": 1.0}}))
    assert "prune.sparsity=1.0 is out of range" in fang("prune", "--params", str(bad))

    bad.write_text(yaml.safe_dump({"model": {"name": str(tmp_path / "no_such_model")}}))
    assert "model path not found" in fang("fetch-model", "--params", str(bad))

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["tasks"] = ["no_such_task"]
    bad.write_text(yaml.safe_dump(params))
    assert "no_such_task" in fang("fetch-data", "--params", str(bad), cwd=tmp_path)

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["calibrate"].update(n_samples=1000, seq_len=256)
    bad.write_text(yaml.safe_dump(params))
    assert "corpus too small" in fang("calibrate", "--params", str(bad))
