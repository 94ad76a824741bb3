"""Where each stage's artifacts live (relative to the project root); dvc.yaml uses the same paths."""

from dataclasses import dataclass
from pathlib import Path

from .errors import require, require_label

ARTIFACTS = Path("artifacts")
MODEL = ARTIFACTS / "model"  # dense float checkpoint + tokenizer
DATA = ARTIFACTS / "data"  # {train,validation,test}.jsonl, corpus.json
TASKS = DATA / "tasks"  # local lm-eval task folder + tasks.json manifest
CALIB = ARTIFACTS / "calib"  # calib.safetensors (input_ids [N, L]) + calib.json
CAPTURE = ARTIFACTS / "capture.zarr"
PRUNED = ARTIFACTS / "pruned"
METRICS = ARTIFACTS / "metrics"
CLUSTER = ARTIFACTS / "cluster.zarr"  # PCA, centroids, token_clusters, down-proj centres, distances
TAYLOR = ARTIFACTS / "taylor.zarr"  # cluster-neuron scores S, block sensitivity
GROUPS = ARTIFACTS / "groups.zarr"  # neuron_groups: functional group id per neuron (k = shared)
ALLOCATE = ARTIFACTS / "allocate.json"  # per-block functional complexity and allocation scores
BLOCK_SPARSITY = ARTIFACTS / "block_sparsity.json"  # per-block sparsity for each sweep target
PLOTS = ARTIFACTS / "plots"
SWEEP = ARTIFACTS / "sweep"  # <method>-<sparsity>/ pruned models, .prune.json, .metrics.json
REPORT = ARTIFACTS / "report"  # results.md, results.csv, sparsity_curves.png
RECIPE = ARTIFACTS / "recipe"  # the recipe study: halves.json, search.json, confirmation.json, confirm/ (the choice's metrics)
RECIPE_CELLS = RECIPE / "cells"  # <recipe>-<sparsity>/ pruned models, .prune.json, .tuning.json (tuning-half metrics)
BIAS = ARTIFACTS / "bias"  # <source>/: the calibration-bias study's per-source calibration and analysis
BIAS_SWEEP = ARTIFACTS / "bias_sweep"  # <source>/<method>-<sparsity>/ pruned models, .prune.json, .metrics.json
BIAS_REPORT = ARTIFACTS / "bias_report"  # bias.md, bias.csv, bias.json, bias_heatmap.png
SCREEN = ARTIFACTS / "screen"  # screen.json, screen.md: which tasks the dense model does above chance
ATTRIBUTION = ARTIFACTS / "attribution.zarr"  # neuron topic selectivity, labels, top contexts (fang attribute)
ATTRIBUTION_SUMMARY = ARTIFACTS / "attribution.json"  # per-topic counts and most selective neurons
ICA = ARTIFACTS / "ica.zarr"  # per-layer ICA spatial maps of the FFN (functional networks, seed 003)
GPRUNE = ARTIFACTS / "gprune.zarr"  # GPrune-LLM modules, rank drift and reliability per layer (seed 002)


@dataclass(frozen=True)
class CalibrationArtifacts:
    """Everything that depends on the calibration set: the main pipeline has one, the bias study one per source."""

    calib: Path
    capture: Path
    cluster: Path
    taylor: Path
    groups: Path
    allocate: Path
    block_sparsity: Path
    metrics: Path  # cluster.json, groups.json
    plots: Path
    ica: Path  # ICA maps (stage ica), read by ica_fn / ica_fn_ranked
    gprune: Path  # GPrune modules (stage gprune_modules), read by gprune


MAIN = CalibrationArtifacts(CALIB, CAPTURE, CLUSTER, TAYLOR, GROUPS, ALLOCATE, BLOCK_SPARSITY, METRICS, PLOTS, ICA, GPRUNE)


RECIPE_ANALYSIS = RECIPE / "analysis"  # <variant>/: the recipe study's analysis variants (fang.core.analyses)


def calibration_artifacts(source: str | None = None, analysis: str | None = None) -> CalibrationArtifacts:
    """The main pipeline's artifacts (`source=None`), those of one bias-study calibration source, or those of
    one recipe-study analysis variant ("k=4"): its own where it changes them, the main pipeline's elsewhere."""
    if analysis is not None:
        require(source is None, "--source and --analysis cannot be combined: a bias source or an analysis variant")
        return _analysis_artifacts(analysis)
    if source is None:
        return MAIN
    root = BIAS / require_label(source, "--source")  # `..` would be the main pipeline's artifacts
    return CalibrationArtifacts(
        root / "calib", root / "capture.zarr", root / "cluster.zarr", root / "taylor.zarr", root / "groups.zarr",
        root / "allocate.json", root / "block_sparsity.json", root / "metrics", root / "plots",
        root / "ica.zarr", root / "gprune.zarr",
    )


def _analysis_artifacts(analysis: str) -> CalibrationArtifacts:
    from .analyses import parse_analysis

    variant = parse_analysis(analysis)
    root = RECIPE_ANALYSIS / variant.name
    own = variant.owns()
    mine = {"calib": root / "calib", "capture": root / "capture.zarr", "cluster": root / "cluster.zarr",
            "taylor": root / "taylor.zarr", "groups": root / "groups.zarr", "allocate": root / "allocate.json"}
    picked = {name: (mine[name] if name in own else getattr(MAIN, name)) for name in mine}
    return CalibrationArtifacts(**picked, block_sparsity=root / "block_sparsity.json", metrics=root / "metrics",
                                plots=root / "plots", ica=MAIN.ica, gprune=MAIN.gprune)
