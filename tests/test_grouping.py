import itertools

import numpy as np
import pytest
import torch

from fang.analysis.grouping import (
    assign_groups_greedy,
    assign_groups_lap,
    assign_groups_random,
    assignment_score,
    balanced_sizes,
    neuron_groups,
    shared_group,
)
from fang.core.errors import FangError


def _rand_scores(k, n, seed, kind="uniform"):
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.random((k, n))
    if kind == "lognormal":  # Taylor-like: heavy-tailed, shared neuron scale across clusters
        return rng.lognormal(size=n)[None] * rng.lognormal(0, 0.3, size=(k, n)) * 1e-4
    return np.round(rng.random((k, n)) * 3) / 3  # many exact ties


def _brute_force_best(s, caps):
    k, n = s.shape
    labels = np.repeat(np.arange(k), caps)
    best = -np.inf
    for perm in set(itertools.permutations(labels.tolist())):
        best = max(best, s[list(perm), np.arange(n)].sum())
    return best


def _check_sizes(groups, caps):
    assert groups.dtype == torch.long and groups.shape == (sum(caps),)
    assert np.bincount(groups.numpy(), minlength=len(caps)).tolist() == list(caps)


def test_balanced_sizes():
    assert balanced_sizes(10, 3) == [4, 3, 3]
    assert balanced_sizes(9, 3) == [3, 3, 3]
    assert balanced_sizes(2, 3) == [1, 1, 0]


# ---------------------------------------------------------------------------- shared group


def test_shared_group_hand_made():
    # m = 2. Cluster tops: c0 -> {0, 1}, c1 -> {1, 2}, c2 -> {1, 3}
    s = torch.tensor(
        [
            [9.0, 8.0, 1.0, 0.0, 0.0],
            [0.0, 7.0, 6.0, 0.0, 5.0],
            [0.0, 4.0, 0.0, 5.0, 0.0],
        ]
    )
    # neuron 1 chosen 3x; 0, 2, 3 once each -> tie broken by total score: 0 (9) > 3 (5), 2 (7)
    assert shared_group(s, 2).tolist() == [1, 0]
    assert shared_group(s, 1).tolist() == [1]
    assert shared_group(s, 0).tolist() == []


def test_shared_group_index_tie_break():
    s = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    # top-2 per cluster with equal scores: lower index first -> {0, 1} for both clusters
    assert shared_group(s, 2).tolist() == [0, 1]


# ------------------------------------------------------------------------------- LAP solver


@pytest.mark.parametrize("k,n,seed", [(2, 7, 0), (3, 6, 1), (3, 7, 2), (3, 8, 3), (4, 8, 4), (2, 9, 5)])
@pytest.mark.parametrize("kind", ["uniform", "ties"])
def test_lap_optimal_by_brute_force(k, n, seed, kind):
    s = _rand_scores(k, n, seed, kind)
    caps = balanced_sizes(n, k)
    best = _brute_force_best(s, caps)
    for solver in ("cycles", "lsa"):
        g = assign_groups_lap(s, caps, solver=solver)
        _check_sizes(g, caps)
        assert assignment_score(s, g) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["uniform", "lognormal", "ties"])
def test_lap_matches_lsa_and_beats_greedy(seed, kind):
    k, n = 7, 300 + 37 * seed
    s = _rand_scores(k, n, seed, kind)
    caps = balanced_sizes(n, k)
    fast = assign_groups_lap(torch.from_numpy(s).float().double(), caps)
    ref = assign_groups_lap(s, caps, solver="lsa")
    greedy = assign_groups_greedy(s, caps)
    for g in (fast, ref, greedy):
        _check_sizes(g, caps)
    scale = np.abs(s).sum()
    assert assignment_score(s, fast) == pytest.approx(assignment_score(s, ref), abs=1e-12 * scale)
    assert assignment_score(s, fast) >= assignment_score(s, greedy) - 1e-12 * scale


def test_lap_uneven_capacities_and_empty_group():
    s = _rand_scores(3, 9, 0)
    for caps in ([5, 4, 0], [1, 1, 7], [0, 9, 0]):
        g = assign_groups_lap(s, caps)
        _check_sizes(g, caps)
        assert assignment_score(s, g) == pytest.approx(_brute_force_best(s, caps))


def test_lap_obvious_case():
    # every neuron clearly prefers one group, and the preferences are balanced
    s = torch.tensor([[5.0, 0.0, 5.0, 0.0], [0.0, 5.0, 0.0, 5.0]])
    assert assign_groups_lap(s, [2, 2]).tolist() == [0, 1, 0, 1]
    assert assign_groups_greedy(s, [2, 2]).tolist() == [0, 1, 0, 1]


def test_greedy_is_suboptimal_where_expected():
    # greedy grabs the global max (group 0 takes neuron 0) and forces neuron 1 into group 1
    s = np.array([[10.0, 9.0], [9.5, 0.0]])
    assert assign_groups_greedy(s, [1, 1]).tolist() == [0, 1]
    assert assign_groups_lap(s, [1, 1]).tolist() == [1, 0]


def test_assignment_errors():
    s = _rand_scores(2, 4, 0)
    with pytest.raises(FangError, match="sum to 5"):
        assign_groups_lap(s, [3, 2])
    with pytest.raises(FangError, match="one capacity per group"):
        assign_groups_lap(s, [4])
    with pytest.raises(FangError, match="solver"):
        assign_groups_lap(s, [2, 2], solver="hungarian")
    with pytest.raises(FangError, match="NaN"):
        assign_groups_lap(np.full((2, 4), np.nan), [2, 2])


def test_random_assignment():
    g1 = assign_groups_random(10, [4, 3, 3], seed=3)
    g2 = assign_groups_random(10, [4, 3, 3], seed=3)
    _check_sizes(g1, [4, 3, 3])
    assert torch.equal(g1, g2)
    assert not torch.equal(g1, assign_groups_random(10, [4, 3, 3], seed=4))


# ----------------------------------------------------------------------------- whole layer


@pytest.mark.parametrize("n", [64, 67, 71])  # 64 = 8 * 8; others not divisible by k + 1
@pytest.mark.parametrize("method", ["lap", "random"])
def test_neuron_groups_partition(n, method):
    k = 7
    s = torch.from_numpy(_rand_scores(k, n, n, "lognormal"))
    groups, info = neuron_groups(s, method=method, seed=1)
    m = n // (k + 1)
    assert groups.shape == (n,) and groups.dtype == torch.long
    counts = np.bincount(groups.numpy(), minlength=k + 1)
    assert counts.size == k + 1 and counts[k] == m == info["shared_size"]
    assert counts[:k].sum() == n - m and counts[:k].max() - counts[:k].min() <= 1
    assert counts[:k].tolist() == info["group_sizes"]
    rest = groups < k
    assert info["total_score"] == pytest.approx(s.numpy()[groups[rest].numpy(), np.flatnonzero(rest.numpy())].sum())
    if method == "lap":
        shared = torch.sort(shared_group(s, m)).values
        assert torch.equal(torch.nonzero(groups == k).flatten(), shared)
        assert info["total_score"] >= info["greedy_total_score"] - 1e-12
        assert info["gain_over_greedy"] >= -1e-12
    else:
        again, _ = neuron_groups(s, method="random", seed=1)
        assert torch.equal(groups, again)


def test_neuron_groups_lap_matches_exhaustive_rest():
    # the functional part of "lap" is optimal on the neurons left after the shared group
    k, n = 2, 9
    s = _rand_scores(k, n, 11)
    groups, info = neuron_groups(s, "lap")
    rest = np.flatnonzero(groups.numpy() < k)
    assert info["total_score"] == pytest.approx(_brute_force_best(s[:, rest], info["group_sizes"]))


def test_neuron_groups_errors():
    s = _rand_scores(7, 7, 0)
    with pytest.raises(FangError, match="at least 8"):
        neuron_groups(s)
    with pytest.raises(FangError, match="grouping method"):
        neuron_groups(_rand_scores(2, 9, 0), method="kmeans")
