"""Where each stage's artifacts live (relative to the project root); dvc.yaml uses the same paths."""

from pathlib import Path

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
