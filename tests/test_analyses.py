"""Analysis variants of the recipe study (fang.core.analyses): names, what each knob rebuilds, where its
artifacts live, the shared group's size, and the params checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fang.analysis.grouping import neuron_groups, shared_size
from fang.core import paths
from fang.core.analyses import parse_analysis
from fang.core.errors import FangError
from fang.core.params import ClusterParams, GroupParams, RecipeParams


def test_names_are_canonical_so_two_spellings_share_one_folder():
    assert parse_analysis("shared=2.0,k=4").name == parse_analysis("k=4,shared=2").name == "k=4,shared=2"
    assert parse_analysis("calib=128x2048").settings == (("calib", (128, 2048)),)


@pytest.mark.parametrize("spec, words", [
    ("", "at least one"), ("k", "not a key=value"), ("tau=3", "not an analysis knob"), ("k=4,k=5", "twice"),
    ("k=1", ">= 2"), ("k=four", ">= 2"), ("calib=128", "SEQUENCESxTOKENS"), ("calib=0x512", "SEQUENCESxTOKENS"),
    ("shared=0", "> 0"), ("shared=wide", "not a number"),
])
def test_bad_variants_are_one_line_errors_naming_the_problem(spec, words):
    with pytest.raises(FangError, match=words) as err:
        parse_analysis(spec)
    assert "\n" not in str(err.value)


def test_each_knob_rebuilds_its_first_artifact_and_everything_after_it():
    assert parse_analysis("shared=2").owns() == ("groups",)
    assert parse_analysis("k=4").owns() == ("cluster", "taylor", "groups", "allocate")
    assert parse_analysis("calib=8x64").owns() == ("calib", "capture", "cluster", "taylor", "groups", "allocate")
    assert parse_analysis("k=4,shared=2").owns() == ("cluster", "taylor", "groups", "allocate")


def test_a_variant_reads_the_main_pipelines_artifacts_it_does_not_change():
    art = paths.calibration_artifacts(analysis="shared=2")
    root = paths.RECIPE_ANALYSIS / "shared=2"
    assert art.groups == root / "groups.zarr" and art.metrics == root / "metrics"
    assert (art.calib, art.capture, art.cluster, art.taylor, art.allocate) == \
        (paths.CALIB, paths.CAPTURE, paths.CLUSTER, paths.TAYLOR, paths.ALLOCATE)
    art = paths.calibration_artifacts(analysis="k=4")
    assert art.capture == paths.CAPTURE and art.cluster == paths.RECIPE_ANALYSIS / "k=4" / "cluster.zarr"
    assert paths.calibration_artifacts(analysis="k=04").cluster == art.cluster  # canonical folder
    with pytest.raises(FangError, match="cannot be combined"):
        paths.calibration_artifacts(source="all", analysis="k=4")


def test_overrides_go_to_their_own_params_block_and_are_validated_again():
    v = parse_analysis("calib=16x128,k=5,shared=0.5")
    assert v.overrides("calibrate") == {"n_samples": 16, "seq_len": 128}
    assert v.overrides("cluster") == {"k": 5} and v.overrides("group") == {"shared_ratio": 0.5}
    assert v.overrides("taylor") == {}
    assert v.apply("cluster", ClusterParams()).k == 5 and ClusterParams().k == 7
    with pytest.raises(FangError, match="pca_dim"):  # the block's own checks run on the replaced values
        parse_analysis("k=4").apply("cluster", dataclasses.replace(ClusterParams(), pca_dim=0))


@pytest.mark.parametrize("n, k", [(1536, 7), (64, 3), (11008, 7), (10, 4)])
def test_the_paper_ratio_is_exactly_n_over_k_plus_one(n, k):
    assert shared_size(n, k) == n // (k + 1)
    assert shared_size(n, k, 2.0) == max(1, int(np.floor(2 * n / (k + 2))))
    assert shared_size(n, k, 0.5) == max(1, int(np.floor(0.5 * n / (k + 0.5))))


def test_shared_ratio_sets_the_shared_group_and_keeps_the_functional_groups_balanced():
    torch.manual_seed(0)
    scores = torch.rand(4, 90)
    for ratio, m in [(1.0, 18), (2.0, 30), (0.5, 10)]:
        ids, info = neuron_groups(scores, "lap", shared_ratio=ratio)
        sizes = torch.bincount(ids, minlength=5).tolist()
        assert sizes[4] == m == info["shared_size"]
        assert max(sizes[:4]) - min(sizes[:4]) <= 1 and sum(sizes[:4]) == 90 - m
        assert abs(m / (sum(sizes[:4]) / 4) - ratio) < 0.15  # shared group ~ ratio x a functional group
    default, _ = neuron_groups(scores, "lap")
    assert torch.equal(default, neuron_groups(scores, "lap", shared_ratio=1.0)[0])  # the paper's groups unchanged
    with pytest.raises(FangError, match="> 0"):
        GroupParams(shared_ratio=0.0).validate()


def test_recipe_params_name_each_variants_candidate_and_check_the_lists():
    p = RecipeParams(candidates=["o_fang+layer"], analyses=["k=4", "shared=2"], analysis_recipe="o_fang+flap_search")
    p.validate()
    assert p.analysis_candidates() == ["o_fang+flap_search@k=4", "o_fang+flap_search@shared=2"]
    for bad, words in [(dict(analysis_recipe=""), "analysis_recipe is empty"),
                       (dict(analyses=["shared=2.0"]), "write 'shared=2.0' as 'shared=2'"),
                       (dict(analyses=["k=4", "k=4"]), "more than once"),
                       (dict(analyses=["tau=3"]), "not an analysis knob"),
                       (dict(analysis_recipe="o_fang,tau=3.0"), "canonical")]:
        with pytest.raises(FangError, match=words):
            dataclasses.replace(p, **bad).validate()
