"""FANG's function-aware FFN pruning: group counts, reweighted statistics (Eq. 11, 15), group-wise OBC
compensation (Eq. 7), the ablation switches, and f_fang / o_fang end to end on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_reloads_identically, captured, tiny_model
from fang.analysis.cluster import center_distances, cluster_centers, kmeans, pca_fit, pca_project, relevance_weights
from fang.core.errors import FangError
from fang.methods.driver import PruneOptions, prune_model
from fang.methods.function_aware import (
    ClusterMoments,
    FangInputs,
    FangLayerPruner,
    GroupHessians,
    group_removal_counts,
    plan_groups,
    reweighted_fluctuation,
)
from fang.methods.obc import inverse_hessian, obc_prune
from fang.model.modeling import count_block_params

K = 3


# ------------------------------------------------------------------------------------------ group counts


def test_group_removal_counts_hit_the_total_and_keep_one_per_group():
    assert group_removal_counts([16, 16, 16], 13) == [5, 4, 4]  # leftover to the lower index on ties
    # a small group hits its cap (keep one) and the others absorb the rest at a higher rate
    assert group_removal_counts([10, 3, 30], 30) == [7, 2, 21]
    assert group_removal_counts([4, 4], 10) == [3, 3]  # cannot reach 10: every group keeps one
    assert group_removal_counts([0, 5, 1], 2) == [0, 2, 0]  # empty and single-neuron groups lose nothing
    assert group_removal_counts([7, 9], 0) == [0, 0]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        sizes = torch.randint(0, 40, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        cap = sum(max(s - 1, 0) for s in sizes)
        n = int(torch.randint(0, cap + 5, (1,), generator=g))
        counts = group_removal_counts(sizes, n)
        assert sum(counts) == min(n, cap)
        assert all(0 <= c <= max(s - 1, 0) for c, s in zip(counts, sizes))
        free = [(c, s) for c, s in zip(counts, sizes) if c < s - 1]
        if 0 < n <= cap and free:
            # groups below their cap share one rate: each within one neuron of its quota
            rate = (n - sum(max(s - 1, 0) for c, s in zip(counts, sizes) if c >= s - 1)) / sum(s for _, s in free)
            assert all(abs(c - rate * s) < 1 + 1e-9 for c, s in free)


def test_plan_groups_for_each_switch():
    ids = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])  # k=3: ids 0..2 functional, 3 shared
    alpha = relevance_weights(torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]]), tau=1.0)
    groups = plan_groups(ids, K, alpha, 4, shared_group=True, function_aware=True)
    assert [g.name for g in groups] == ["group 0", "group 1", "group 2"]
    assert sum(g.n_remove for g in groups) == 4 and [g.columns.tolist() for g in groups][1] == [1, 5, 9]
    torch.testing.assert_close(groups[2].alpha, alpha[2].double())
    groups = plan_groups(ids, K, alpha, 4, shared_group=False, function_aware=True)
    assert [g.name for g in groups][-1] == "shared" and [g.n_remove for g in groups] == [1, 1, 1, 1]
    torch.testing.assert_close(groups[-1].alpha, torch.full((K,), 1 / K, dtype=torch.float64))
    (layer,) = plan_groups(ids, K, alpha, 4, shared_group=True, function_aware=False)
    assert layer.columns.numel() == 12 and layer.removable.tolist() == [i % 4 != 3 for i in range(12)]
    assert torch.equal(layer.alpha, torch.ones(K, dtype=torch.float64)) and layer.n_remove == 4
    (layer,) = plan_groups(ids, K, alpha, 20, shared_group=False, function_aware=False)
    assert bool(layer.removable.all()) and layer.n_remove == 11  # the layer keeps one neuron


# ------------------------------------------------------------------------------- reweighted statistics


def _data(n=12, t=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (t,), generator=g)
    # clusters with different means and spreads per channel, so weights matter
    x = torch.randn(t, n, generator=g, dtype=torch.float64) * (1 + labels[:, None]) + labels[:, None] * 0.7 + 2.0
    w = torch.randn(5, n, generator=g, dtype=torch.float64)
    return x, labels, w


def test_reweighted_fluctuation_is_eq15():
    x, labels, w = _data()
    mom = ClusterMoments(K)
    mom.add_batch(x[:50], labels[:50])
    mom.add_batch(x[50:], labels[50:])
    mean = mom.total().mean
    torch.testing.assert_close(mean, x.mean(0))
    alpha = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    got = reweighted_fluctuation(w, mom.deviation_sums(mean), alpha)
    expected = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(x.shape[1]):
        s = sum(float(alpha[m]) * float(((x[labels == m, i] - x[:, i].mean()) ** 2).sum()) for m in range(K))
        expected[i] = s * float((w[:, i] ** 2).sum())
    torch.testing.assert_close(got, expected)


def test_group_hessians_are_eq11():
    x, labels, _ = _data()
    ids = torch.arange(12) % (K + 1)
    alpha = relevance_weights(torch.rand(K, K, generator=torch.Generator().manual_seed(3)) * 4, tau=1.0).double()
    groups = plan_groups(ids, K, alpha, 6)
    gh = GroupHessians(groups)
    gh.add_batch(x[:40], labels[:40])
    gh.add_batch(x[40:], labels[40:])
    for g, acc in zip(groups, gh.acc):
        xg = x[:, g.columns]
        expected = sum(float(alpha[int(g.name[-1]), j]) * xg[labels == j].T @ xg[labels == j] for j in range(K))
        torch.testing.assert_close(acc.hessian * acc.weight_sum, expected)  # the accumulator keeps the mean


def _run_layer(base, groups, ids, x, labels, w, damp=0.01):
    pruner = FangLayerPruner(base, groups, ids, K, damp=damp, where="layer 0 down_proj")
    pruner.add_batch(x[:45], labels[:45])
    pruner.add_batch(x[45:], labels[45:])
    return pruner.select(w)


def test_uniform_weights_give_the_plain_hessian_decisions():
    """alpha = 1/k scales every H_k by 1/k: same masks and compensated weights as the plain group Hessian."""
    x, labels, w = _data(seed=4)
    ids = torch.arange(12) % (K + 1)
    uniform = relevance_weights(torch.ones(K, K), tau=1.0, mode="uniform")
    groups = plan_groups(ids, K, uniform, 6)
    sel = _run_layer("obc", groups, ids, x, labels, w)
    pruned = torch.ones(12, dtype=torch.bool)
    pruned[sel.keep] = False
    expected_w = w.clone()
    for g in groups:
        xg = x[:, g.columns]
        keep, wg = obc_prune(w[:, g.columns], inverse_hessian(xg.T @ xg, 0.01), g.n_remove)
        expected_keep = torch.zeros(g.columns.numel(), dtype=torch.bool)
        expected_keep[keep] = True
        assert torch.equal(~pruned[g.columns], expected_keep)
        expected_w[:, g.columns] = wg
    torch.testing.assert_close(sel.weight, expected_w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("base", ["flap", "obc"])
@pytest.mark.parametrize("shared_group", [True, False])
def test_group_wise_pruning_counts_and_shared_group(base, shared_group):
    x, labels, w = _data(n=16, seed=5)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 2, 0])  # sizes 4, 4, 4; shared 4
    alpha = relevance_weights(torch.tensor([[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]]), tau=1.0)
    groups = plan_groups(ids, K, alpha, 6, shared_group=shared_group)
    sel = _run_layer(base, groups, ids, x, labels, w)
    info = sel.info
    if shared_group:
        assert info["groups_removed"] == [2, 2, 2] and info["shared_removed"] == 0
        assert set(torch.nonzero(ids == 3).reshape(-1).tolist()) <= set(sel.keep.tolist())
    else:  # 6 over four groups of 4: the shared group is one more group at the same rate
        assert sum(info["groups_removed"]) + info["shared_removed"] == 6 and info["shared_removed"] == 1
    assert info["group_sizes"] == [4, 4, 4] and info["shared_size"] == 4
    assert info["token_clusters"] == torch.bincount(labels, minlength=K).tolist()
    pruned = torch.ones(16, dtype=torch.bool)
    pruned[sel.keep] = False
    if base == "flap":
        torch.testing.assert_close(sel.bias, w[:, pruned] @ x.mean(0)[pruned])  # Eq. 13 with the plain mean
        assert sel.weight is None
    else:
        assert sel.bias is None
        assert torch.equal(sel.weight[:, pruned], torch.zeros(5, int(pruned.sum()), dtype=torch.float64))
        if shared_group:  # the shared columns are never touched by any group's compensation
            assert torch.equal(sel.weight[:, ids == 3], w[:, ids == 3])


def test_group_wise_obc_is_the_weighted_least_squares_optimum_of_eq7():
    """Within group g, the compensated kept columns minimise sum_t alpha[g, c(t)] ||W_G x_G - W'_K x_K||^2."""
    x, labels, w = _data(n=16, t=150, seed=6)
    ids = torch.arange(16) % (K + 1)
    alpha = relevance_weights(torch.tensor([[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]]), tau=0.7)
    groups = plan_groups(ids, K, alpha, 5)
    sel = _run_layer("obc", groups, ids, x, labels, w, damp=0.0)
    kept = torch.zeros(16, dtype=torch.bool)
    kept[sel.keep] = True
    for g in groups:
        cols = g.columns
        kcols = cols[kept[cols]]
        sw = g.alpha[labels].sqrt()[:, None]
        target = (x[:, cols] @ w[:, cols].T) * sw
        fit = torch.linalg.lstsq(x[:, kcols] * sw, target).solution.T
        torch.testing.assert_close(sel.weight[:, kcols], fit, rtol=1e-7, atol=1e-9)


def test_reweighting_changes_group_decisions():
    """Different token weights change which neurons a group keeps (here: clusters with opposite spreads)."""
    g = torch.Generator().manual_seed(7)
    t, n = 120, 8
    labels = torch.arange(t) % K
    x = torch.randn(t, n, generator=g, dtype=torch.float64)
    # channel i varies a lot in cluster i % K and barely elsewhere
    scale = torch.where((torch.arange(n)[None, :] % K) == labels[:, None], 3.0, 0.1)
    x = x * scale
    w = torch.ones(4, n, dtype=torch.float64)
    ids = torch.zeros(n, dtype=torch.long)
    ids[-1] = K  # one shared neuron; the rest all in group 0
    dist = torch.tensor([[0.0, 2.0, 4.0], [2.0, 0.0, 2.0], [4.0, 2.0, 0.0]])
    kept = {}
    for mode in ("ours", "uniform", "reverse", "only_matched"):
        groups = plan_groups(ids, K, relevance_weights(dist, tau=1.0, mode=mode), 3)
        for base in ("flap", "obc"):
            kept[mode, base] = set(_run_layer(base, groups, ids, x, labels, w).keep.tolist())
    for base in ("flap", "obc"):
        # group 0 under "ours"/"only_matched" favours channels active in cluster 0 (0, 3, 6)
        assert {0, 3, 6} <= kept["only_matched", base] and {0, 3, 6} <= kept["ours", base]
        assert kept["reverse", base] != kept["ours", base]
        assert kept["uniform", base] != kept["only_matched", base]


def test_group_without_tokens_falls_back():
    x, labels, w = _data(seed=8)
    labels = torch.where(labels == 2, torch.zeros_like(labels), labels)  # cluster 2 is empty
    ids = torch.arange(12) % (K + 1)
    only = relevance_weights(torch.ones(K, K), tau=1.0, mode="only_matched")
    groups = plan_groups(ids, K, only, 6)
    for base in ("flap", "obc"):
        sel = _run_layer(base, groups, ids, x, labels, w)
        assert sel.info["groups_without_tokens"] == ["group 2"] and sel.info["groups_removed"] == [2, 2, 2]
        if base == "obc":
            assert torch.isfinite(sel.weight).all()


# ------------------------------------------------------------------------------------ tiny models


def make_fang_inputs(cap, sparsity, grouping="lap", seed=0, groups=None, k=K, pca_dim=4):
    """FangInputs from a dense capture: PCA + KMeans of ffn_in, centre distances at down_in,
    groups from fang.grouping on random cluster-neuron scores (or given), per-block sparsity."""
    from fang.analysis.grouping import neuron_groups

    n_layers = cap.attrs["n_layers"]
    out = {f: [] for f in ("pca_mean", "pca_components", "centroids", "center_distances", "neuron_groups")}
    for li in range(n_layers):
        x = torch.from_numpy(np.asarray(cap["ffn_in"][li])).float()
        mean, comps = pca_fit(x, pca_dim)
        cents, assign, _ = kmeans(pca_project(x, mean, comps), k, seed=0)
        down = torch.from_numpy(np.asarray(cap["down_in"][li])).float()
        out["pca_mean"].append(mean)
        out["pca_components"].append(comps)
        out["centroids"].append(cents)
        out["center_distances"].append(center_distances(cluster_centers(down, assign, k)))
        if groups is None:
            scores = torch.rand(k, down.shape[1], generator=torch.Generator().manual_seed(100 + li))
            out["neuron_groups"].append(neuron_groups(scores, method=grouping, seed=seed)[0])
        else:
            out["neuron_groups"].append(torch.as_tensor(groups[li]))
    return FangInputs(**{key: torch.stack(v) for key, v in out.items()}, sparsity=torch.tensor(sparsity))


def _kept_neurons(dense, pruned, li=0):
    """Which dense neurons a pruned layer kept: up_proj rows are copied untouched by every method."""
    up_d = dense.model.layers[li].mlp.up_proj.weight.detach()
    up_p = pruned.model.layers[li].mlp.up_proj.weight.detach()
    return frozenset(int(torch.nonzero((up_d == row).all(1))[0]) for row in up_p)


@pytest.mark.parametrize("method", ["f_fang", "o_fang"])
@pytest.mark.parametrize("heads,scheme", [((4, 4), "kv_group"), ((6, 3), "kv_group"), ((6, 3), "query_slot")])
def test_fang_prunes_to_target_and_reloads(method, heads, scheme, calib, tmp_path):
    model = tiny_model(*heads, layers=2)
    cap = captured(model, calib, tmp_path, batch_size=3)
    inputs = make_fang_inputs(cap, [0.2, 0.4])
    dense = count_block_params(model)
    opts = PruneOptions(tau=1.0)
    report = prune_model(model, cap, method, 0.3, scheme, batch_size=4, options=opts, inputs=inputs)
    assert report.pruned_block_params == count_block_params(model) < dense
    assert abs(report.achieved_sparsity - 0.3) < 0.01  # mean of the per-block targets, equal block sizes
    neuron = 3 * model.config.hidden_size
    for layer, spec, s in zip(model.model.layers, report.layers, (0.2, 0.4)):
        # each block loses its allocated fraction of parameters, the FFN absorbing the head rounding
        # (f_fang adds FLAP's two compensation bias vectors, which the plan does not count)
        removed = dense // 2 - sum(p.numel() for p in layer.parameters())
        bias = 2 * model.config.hidden_size if method == "f_fang" else 0
        assert abs(removed + bias - s * dense / 2) <= neuron / 2
        assert spec["shared_removed"] == 0 and spec["shared_size"] == 64 // (K + 1)
        assert sum(spec["groups_removed"]) == spec["ffn_removed_target"] == 64 - spec["ffn"]
        assert max(spec["groups_removed"]) - min(spec["groups_removed"]) <= 1  # equal groups, equal shares
        assert sum(spec["token_clusters"]) == calib.numel()
    assert_reloads_identically(model, calib, tmp_path)


@pytest.mark.parametrize("method", ["f_fang", "o_fang"])
def test_every_ablation_switch_changes_the_masks(method, calib, tmp_path):
    base_model = tiny_model(4, 4, layers=1)
    cap = captured(base_model, calib, tmp_path, batch_size=3)
    n = 64
    # groups stratified by down_proj column norm: group 0 holds the weakest neurons, the shared group
    # the next weakest, so an ungrouped prune concentrates on group 0 and a pruned shared group loses some
    order = torch.argsort(base_model.model.layers[0].mlp.down_proj.weight.detach().norm(dim=0))
    ids = torch.empty(n, dtype=torch.long)
    ids[order] = torch.tensor([0] * 16 + [K] * 16 + [1] * 16 + [2] * 16)
    # 50%: two of the four heads are exactly half the attention, so the FFN also loses 32 of 64 neurons
    inputs = make_fang_inputs(cap, [0.5], groups=[ids])
    rnd = make_fang_inputs(cap, [0.5], grouping="random", seed=3)
    dists = inputs.center_distances[0]
    tau = float(dists[dists > 0].median()) / 4  # sharp enough that the weights really differ

    def kept(**kw):
        fi = kw.pop("inputs", inputs)
        model = tiny_model(4, 4, layers=1)
        report = prune_model(model, cap, method, 0.5, options=PruneOptions(tau=tau, **kw), inputs=fi)
        return _kept_neurons(base_model, model), report.layers[0]

    ref, spec = kept()
    assert spec["shared_removed"] == 0 and spec["ffn_removed_target"] == 32
    no_shared, spec_ns = kept(shared_group=False)
    assert spec_ns["shared_removed"] > 0 and no_shared != ref
    ungrouped, spec_ug = kept(function_aware=False)
    assert spec_ug["shared_removed"] == 0 and spec_ug["groups_removed"][0] > spec["groups_removed"][0]
    assert ungrouped != ref
    assert kept(inputs=rnd)[0] != ref
    by_mode = {mode: kept(reweighting=mode)[0] for mode in ("uniform", "reverse", "only_matched")}
    by_mode["ours"] = ref
    assert len(set(by_mode.values())) >= 3, "reweighting modes should mostly pick different neurons"
    assert by_mode["uniform"] != ref and by_mode["reverse"] != ref


def test_fang_input_errors(calib, tmp_path):
    model = tiny_model(4, 4, layers=2)
    cap = captured(model, calib, tmp_path, batch_size=3)
    good = make_fang_inputs(cap, [0.3, 0.3])

    def run(inputs, **kw):
        model = tiny_model(4, 4, layers=2)
        return prune_model(model, cap, "o_fang", 0.3, options=PruneOptions(**kw), inputs=inputs)

    with pytest.raises(FangError, match="tau"):
        run(good, tau=0.0)
    with pytest.raises(FangError, match="analysis artifacts"):
        run(None)
    # groups built for k=4 (shared id 4) while the centroids have k=3
    bad = make_fang_inputs(cap, [0.3, 0.3])
    bad.neuron_groups = torch.where(bad.neuron_groups == K, K + 1, bad.neuron_groups)
    with pytest.raises(FangError, match="k=3"):
        run(bad)
    # groups built for k=2 (ids 0..2, shared 2) against k=3 centroids: no neuron has the shared id 3
    bad = make_fang_inputs(cap, [0.3, 0.3])
    bad.neuron_groups = torch.where(bad.neuron_groups == K, K - 1, bad.neuron_groups)
    with pytest.raises(FangError, match="shared id 3"):
        run(bad)
    bad = make_fang_inputs(cap, [0.3])
    with pytest.raises(FangError, match="sparsity has 1 layers"):
        run(bad)
    bad = make_fang_inputs(cap, [0.3, 0.3])
    bad.center_distances = bad.center_distances[:, :2, :2]
    with pytest.raises(FangError, match="center_distances"):
        run(bad)
