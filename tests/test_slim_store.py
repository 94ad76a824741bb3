"""The slim capture store (capture.keep: []) gives the same downstream artifacts as the full one.

"Full path" below is what the stages computed from the full arrays before the store was slimmed:
PCA and KMeans of ffn_in, cluster centres from down_in, FC from block_io, block 0's input from
block_io[0]. "Slim path" is what they compute now: the PCA and FC accumulated while capturing,
the centres measured by taylor.
"""

import numpy as np
import pytest
import torch

from conftest import tiny_model
from fang.analysis.allocate import ComplexityStats, allocate_sparsity
from fang.analysis.capture import FULL_ARRAYS, capture_features, open_capture, require_array
from fang.analysis.cluster import CenterStats, center_distances, kmeans, pca_fit, pca_project
from fang.analysis.grouping import neuron_groups
from fang.analysis.taylor import taylor_scores
from fang.core.errors import FangError
from fang.methods.driver import PruneOptions, prune_model
from fang.methods.function_aware import FangInputs

K, PCA = 3, 6


def _ids(n=8, length=24):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(11))


def _stores(tmp_path, dtype):
    model = tiny_model(6, 3, layers=3)
    ids = _ids()
    capture_features(model, ids, tmp_path / "full.zarr", batch_size=3, dtype=dtype, pca_dim=PCA)
    capture_features(model, ids, tmp_path / "slim.zarr", batch_size=3, dtype=dtype, pca_dim=PCA, keep=[])
    return model, ids, open_capture(tmp_path / "full.zarr"), open_capture(tmp_path / "slim.zarr")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_slim_store_keeps_only_what_stages_read_and_the_same_values(dtype, tmp_path):
    _, _, full, slim = _stores(tmp_path, dtype)
    assert all(name in full for name in FULL_ARRAYS) and not any(name in slim for name in FULL_ARRAYS)
    for name in ("token_ids", "fc", "pca_mean", "pca_components", "ffn_proj", "o_proj_in_var", "down_in_var"):
        assert np.array_equal(full[name][:], slim[name][:]), name
    n_layers, chunk = full.attrs["n_layers"], full["block_io"].chunks[1]
    for li in range(n_layers):
        # the PCA fitted while capturing is the one the cluster stage fitted on the stored ffn_in
        x = torch.from_numpy(full["ffn_in"][li]).float()
        mean, comps = pca_fit(x, PCA)
        assert torch.equal(mean, torch.from_numpy(slim["pca_mean"][li]))
        assert torch.equal(comps, torch.from_numpy(slim["pca_components"][li]))
        assert torch.equal(pca_project(x, mean, comps), torch.from_numpy(slim["ffn_proj"][li]))
        # FC accumulated while capturing is the one allocate streamed from block_io
        io_in = torch.from_numpy(full["block_io"][li])
        io_out = torch.from_numpy(full["block_io"][li + 1])
        stats = ComplexityStats()
        for s in range(0, io_in.shape[0], chunk):
            stats.add_batch(io_in[s : s + chunk], io_out[s : s + chunk])
        assert stats.value == float(slim["fc"][li])
    slim_bytes = sum(f.stat().st_size for f in (tmp_path / "slim.zarr").rglob("*") if f.is_file())
    full_bytes = sum(f.stat().st_size for f in (tmp_path / "full.zarr").rglob("*") if f.is_file())
    assert slim_bytes < full_bytes / 2


def _fang_inputs(store, model, ids, slim: bool, sparsity: float) -> FangInputs:
    n_layers = store.attrs["n_layers"]
    parts = {f: [] for f in ("pca_mean", "pca_components", "centroids")}
    assigns = []
    for li in range(n_layers):
        if slim:
            mean = torch.from_numpy(store["pca_mean"][li])
            comps = torch.from_numpy(store["pca_components"][li])
            proj = torch.from_numpy(store["ffn_proj"][li])
        else:
            x = torch.from_numpy(store["ffn_in"][li]).float()
            mean, comps = pca_fit(x, PCA)
            proj = pca_project(x, mean, comps)
        cents, assign, _ = kmeans(proj, K, seed=0)
        parts["pca_mean"].append(mean)
        parts["pca_components"].append(comps)
        parts["centroids"].append(cents)
        assigns.append(assign)
    clusters = torch.stack(assigns)
    res = taylor_scores(model, ids, clusters, K, batch_size=2)
    if slim:
        centres = res["down_centers"]
        fc = [float(v) for v in store["fc"][:]]
    else:
        centres, fc = [], []
        for li in range(n_layers):
            c = CenterStats(K, store["down_in"].shape[2])
            c.add_batch(torch.from_numpy(store["down_in"][li]), clusters[li])
            centres.append(c.centers)
            io = torch.from_numpy(store["block_io"][:])
            stats = ComplexityStats()
            stats.add_batch(io[li], io[li + 1])
            fc.append(stats.value)
    groups = torch.stack([neuron_groups(res["scores"][li], method="lap")[0] for li in range(n_layers)])
    return FangInputs(
        **{k: torch.stack(v) for k, v in parts.items()},
        center_distances=torch.stack([center_distances(c) for c in centres]),
        neuron_groups=groups,
        sparsity=torch.tensor(allocate_sparsity("fc", fc, sparsity, n_blocks=n_layers)),
    ), clusters


def _kept(dense, pruned):
    out = []
    for ld, lp in zip(dense.model.layers, pruned.model.layers):
        for a, b in ((ld.self_attn.q_proj, lp.self_attn.q_proj), (ld.mlp.up_proj, lp.mlp.up_proj)):
            out.append(sorted(int(torch.nonzero((a.weight == row).all(1))[0]) for row in b.weight.detach()))
    return out


@pytest.mark.parametrize("method", ["f_fang", "o_fang", "flap", "obc"])
def test_slim_and_full_stores_give_the_same_clusters_groups_allocation_and_masks(method, tmp_path):
    model, ids, full, slim = _stores(tmp_path, "float32")
    dense = tiny_model(6, 3, layers=3)
    results = {}
    for name, store in (("full", full), ("slim", slim)):
        inputs, clusters = _fang_inputs(store, dense, ids, slim=name == "slim", sparsity=0.3)
        m = tiny_model(6, 3, layers=3)
        fi = inputs if method in ("f_fang", "o_fang") else None
        report = prune_model(m, store, method, 0.3, batch_size=3, options=PruneOptions(tau=1.0), inputs=fi)
        results[name] = (clusters, inputs, _kept(dense, m), report.layers)
    (c_full, in_full, kept_full, _), (c_slim, in_slim, kept_slim, _) = results["full"], results["slim"]
    assert torch.equal(c_full, c_slim)  # clusters
    assert torch.equal(in_full.neuron_groups, in_slim.neuron_groups)  # groups
    assert torch.equal(in_full.sparsity, in_slim.sparsity)  # allocation
    # centres from taylor's float32 recomputation vs the captured down_in: float32 round-off only
    torch.testing.assert_close(in_full.center_distances, in_slim.center_distances, rtol=1e-5, atol=1e-6)
    assert kept_full == kept_slim  # masks


def test_missing_arrays_are_clear_errors(tmp_path):
    model = tiny_model(4, 4)
    capture_features(model, _ids(2, 8), tmp_path / "s.zarr", batch_size=2, keep=[])
    store = open_capture(tmp_path / "s.zarr")
    with pytest.raises(FangError, match="no down_in array: add down_in to capture.keep"):
        require_array(store, "down_in", tmp_path / "s.zarr")
    with pytest.raises(FangError, match="no ffn_proj array: rerun the capture stage with cluster.pca_dim"):
        require_array(store, "ffn_proj", tmp_path / "s.zarr")
    with pytest.raises(FangError, match="capture.keep: unknown arrays"):
        capture_features(model, _ids(2, 8), tmp_path / "t.zarr", keep=["logits"])


def test_slim_footprint_and_llama2_7b_estimate(tmp_path):
    from fang.tools.bench import memory as bench

    _, _, _, _ = _stores(tmp_path, "float16")
    fp = bench.capture_footprint(tmp_path / "slim.zarr")
    arrays = {a["name"]: a for a in fp["arrays"]}
    assert arrays["ffn_proj"]["scales"] == "token_layer" and arrays["ffn_proj"]["width_dim"] == "pca_dim"
    assert arrays["pca_components"]["scales"] == "layer" and arrays["fc"]["scales"] == "layer"
    assert fp["bytes_per_token_layer"] == PCA * 4  # the float32 projections are all that scales with tokens
    est = bench.estimate_memory(fp)
    assert est["check"]["ok"]  # the formula reproduces the measured store
    # LLaMA-2-7B at 128 x 2048 tokens: the projections do not grow with the model's width
    assert est["disk"]["uncompressed_bytes"] == 128 * 2048 * 32 * PCA * 4 <= 16 * 2**30
    full = bench.estimate_memory(bench.capture_footprint(tmp_path / "full.zarr"))
    assert full["disk"]["uncompressed_bytes"] == 128 * 2048 * ((33 * 4096 + 32 * 4096 + 32 * 11008) * 2 + 32 * PCA * 4)


def test_capture_keep_defaults_to_nothing_and_rejects_unknown_names():
    from fang.core.params import CaptureParams

    assert CaptureParams().keep == []
    with pytest.raises(FangError, match="capture.keep: unknown arrays \\['hidden'\\]"):
        CaptureParams(keep=["hidden", "ffn_in"]).validate()
