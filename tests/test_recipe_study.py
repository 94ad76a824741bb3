"""The recipe study end to end: `dvc repro studies/recipe/dvc.yaml` on a tiny project whose dev set is the seed
paper's seven tasks (tiny Arrow stand-ins) plus next-sentence. DVC runs the sweep cells the study reads, prunes and
scores the candidates on the tuning half, chooses, and confirms once on the other half; a second repro runs
nothing, and a knob that leaves the analysis alone (recipe.seed) reruns none of the analysis or the pruning."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml
from helpers_project import ROOT, dvc, make_project, stage_names
from helpers_tasks import write_olmo_folder

from fang.data.paper_tasks import PAPER_TASKS

pytestmark = pytest.mark.slow

RECIPE_FILE = "studies/recipe/dvc.yaml"
ANALYSIS = {"fetch_model", "fetch_data", "calibrate", "capture", "cluster", "taylor", "group", "allocate"}
VARIANTS = ["k=2", "shared=2", "calib=3x32"]  # one of each analysis knob (fang.core.analyses)


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    """(project root, stages the first `dvc repro studies/recipe/dvc.yaml` ran)."""
    root = make_project(tmp_path_factory.mktemp("recipe") / "project")
    (root / RECIPE_FILE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / RECIPE_FILE, root / RECIPE_FILE)
    write_olmo_folder(root / "olmo", n=8)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(tasks=[*PAPER_TASKS, "next_sentence"], bigbench="", task_source=str(root / "olmo"))
    params["sweep"].update(methods=["flap", "f_fang"], sparsities=[0.3], task_limit=0)
    params["recipe"].update(seed=0, sparsities=[0.3], confirm_sparsities=[0.3], candidates=["f_fang+uniform"],
                            sweep_candidates=["f_fang"], baselines=["flap"], analyses=VARIANTS,
                            analysis_recipe="f_fang+uniform")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    return root, stage_names(dvc(root, "repro", RECIPE_FILE))


def test_the_study_runs_the_sweep_cells_it_reads_then_chooses_and_confirms(studied):
    root, ran = studied
    # the sweep rows it compares with, through DVC (recipe_select and recipe_confirm read artifacts/sweep)
    assert {"sweep_dense", "sweep_prune@flap-0.3", "sweep_prune@f_fang-0.3", "sweep_evaluate@flap-0.3",
            "sweep_evaluate@f_fang-0.3"} <= ran
    assert {"recipe_split", "recipe_inputs@f_fang+uniform", "recipe_prune@f_fang+uniform-0.3",
            "recipe_evaluate@f_fang+uniform-0.3", "recipe_select", "recipe_confirm"} <= ran
    halves = json.loads((root / "artifacts/recipe/halves.json").read_text())["halves"]
    for task in PAPER_TASKS:  # 8 questions per task, 4 in each half, none in both
        tuning, confirmation = set(halves["tuning"][task]), set(halves["confirmation"][task])
        assert len(tuning) == len(confirmation) == 4 and not tuning & confirmation
    tuned = json.loads((root / "artifacts/recipe/cells/f_fang+uniform-0.3.tuning.json").read_text())
    assert {t: sorted(e["per_example"]["doc_id"]) for t, e in tuned["tasks"].items() if t in PAPER_TASKS} \
        == {t: sorted(halves["tuning"][t]) for t in PAPER_TASKS}  # scored on the tuning half only
    search = json.loads((root / "artifacts/recipe/search.json").read_text())
    variants = {f"f_fang+uniform@{v}" for v in VARIANTS}
    assert {row["recipe"] for row in search["table"]} == {"f_fang", "f_fang+uniform"} | variants
    assert search["choice"]["recipe"] in {"f_fang", "f_fang+uniform"} | variants
    confirmation = json.loads((root / "artifacts/recipe/confirmation.json").read_text())
    assert confirmation["recipe"] == search["choice"]["recipe"] and confirmation["half"] == "confirmation"
    [verdict] = confirmation["verdicts"]
    assert verdict["avg7"]["n"] == sum(len(v) for t, v in halves["confirmation"].items() if t in PAPER_TASKS)
    assert verdict["avg7"]["verdict"] in {"better", "worse", "no detectable difference"}


def test_a_second_repro_runs_nothing_and_a_new_split_reruns_no_analysis_or_pruning(studied, tmp_path):
    from helpers_project import copy_project

    root, _ = studied
    assert stage_names(dvc(root, "repro", RECIPE_FILE)) == set()
    project = copy_project(root, tmp_path / "copy")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["recipe"]["seed"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    ran = stage_names(dvc(project, "repro", RECIPE_FILE))
    assert {"recipe_split", "recipe_evaluate@f_fang+uniform-0.3", "recipe_select", "recipe_confirm"} <= ran
    assert not ran & ANALYSIS and not any(s.startswith(("recipe_prune", "sweep_")) for s in ran), ran


def test_each_analysis_variant_builds_only_what_it_changes_and_its_cells_are_pruned_from_it(studied):
    from safetensors.torch import load_file

    root, ran = studied
    for v in VARIANTS:
        assert {f"recipe_analysis@{v}", f"recipe_analysis_inputs@{v}", f"recipe_analysis_prune@{v}-0.3",
                f"recipe_analysis_evaluate@{v}-0.3"} <= ran
    folder = root / "artifacts/recipe/analysis"
    built = {v: sorted(p.name for p in (folder / v).iterdir() if p.name not in ("metrics", "plots")) for v in VARIANTS}
    assert built["shared=2"] == ["groups.zarr"]  # the shared-group size changes the groups only
    assert built["k=2"] == ["allocate.json", "block_sparsity.json", "cluster.zarr", "groups.zarr", "taylor.zarr"]
    assert built["calib=3x32"] == ["allocate.json", "block_sparsity.json", "calib", "capture.zarr", "cluster.zarr",
                                   "groups.zarr", "taylor.zarr"]
    assert tuple(load_file(folder / "calib=3x32/calib/calib.safetensors")["input_ids"].shape) == (3, 32)
    import zarr

    k2 = zarr.open_group(str(folder / "k=2/groups.zarr"), mode="r")["neuron_groups"][:]
    assert k2.max() == 2  # two functional groups (0, 1) and the shared id 2
    main = zarr.open_group(str(root / "artifacts/groups.zarr"), mode="r")["neuron_groups"][:]
    wide = zarr.open_group(str(folder / "shared=2/groups.zarr"), mode="r")["neuron_groups"][:]
    n, k = main.shape[1], 3
    assert (main == k).sum(axis=1).tolist() == [n // (k + 1)] * main.shape[0]
    assert (wide == k).sum(axis=1).tolist() == [int(2 * n / (k + 2))] * main.shape[0]  # twice a functional group
    # the manifest of a variant's cell names the variant's artifacts, the main pipeline's for the rest
    manifest = (root / "artifacts/method_inputs/recipe/f_fang+uniform@shared=2.json").read_text()
    assert "artifacts/recipe/analysis/shared=2/groups.zarr" in manifest and "artifacts/taylor.zarr" in manifest
    for v in VARIANTS:
        assert (root / f"artifacts/recipe/cells/f_fang+uniform@{v}-0.3/config.json").is_file()
