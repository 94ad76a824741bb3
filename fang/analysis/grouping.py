"""Neuron-to-function assignment (paper: "Neuron-to-Function Assignment using S" and
"Shared Neuron Group Retention").

Given the cluster-neuron score matrix S [k, n] of one FFN layer (Eq. 5), neurons are split into
one shared group (kept unpruned) and k equally sized functional groups, each most relevant to
one token cluster. Group ids: 0..k-1 functional (group g belongs to token cluster g), k = shared.

Exact assignment
----------------
Assigning n_rest neurons to k groups of fixed sizes to maximise the summed score is a balanced
linear assignment problem. The textbook formulation repeats each group's row to its capacity and
solves an n_rest x n_rest LAP (scipy `linear_sum_assignment`, O(n^3), dense n^2 matrix). On 2 CPU
cores: 2-5 s for n=1536, ~65 s for n=4096, not done after 13 min for LLaMA-7B's n=11008 (and a
0.97 GB cost matrix). It is kept as `solver="lsa"` for cross-checking.

The default `solver="cycles"` exploits k << n: the problem is a transportation problem with k
sources, and a feasible assignment is optimal iff its residual graph has no negative cycle. That
graph collapses to k group nodes: the edge a -> b costs the cheapest move of one neuron from
group a to group b, min_{j in a} (S[a, j] - S[b, j]); a simple cycle moves one neuron along each
edge (distinct neurons, all sizes unchanged). Starting from the greedy assignment we cancel
negative cycles (found by Bellman-Ford on k nodes) until none is left, which certifies
optimality. Each round costs O(k n); a few hundred rounds suffice in practice (n=11008, k=7:
~0.1-0.3 s), and the result's total equals the LSA optimum in the tests.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..core.errors import FangError, require

GROUP_METHODS = ("lap", "random")
LAP_SOLVERS = ("cycles", "lsa")


def _scores_np(scores: Tensor | np.ndarray, name: str = "scores") -> np.ndarray:
    if isinstance(scores, Tensor):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    s = np.asarray(scores, dtype=np.float64)
    require(s.ndim == 2, f"{name} must be a [clusters, neurons] matrix, got shape {s.shape}")
    require(s.shape[0] >= 1 and s.shape[1] >= 1, f"{name} is empty: shape {s.shape}")
    require(bool(np.isfinite(s).all()), f"{name} contains NaN or Inf (check the Taylor scores)")
    return s


def _check_capacities(capacities: Sequence[int], k: int, n: int) -> np.ndarray:
    caps = np.asarray(list(capacities), dtype=np.int64)
    require(caps.ndim == 1 and caps.size == k, f"need one capacity per group: got {caps.size} for {k} groups")
    require(bool((caps >= 0).all()), f"group capacities must be non-negative, got {caps.tolist()}")
    require(int(caps.sum()) == n, f"group capacities sum to {int(caps.sum())} but there are {n} neurons to assign")
    return caps


def balanced_sizes(total: int, k: int) -> list[int]:
    """Split `total` into k sizes differing by at most 1 (the first total % k groups get one more)."""
    base, extra = divmod(total, k)
    return [base + 1 if g < extra else base for g in range(k)]


def assignment_score(scores: Tensor | np.ndarray, groups: Tensor | np.ndarray) -> float:
    """Sum over neurons of the score of the group each neuron is assigned to."""
    s = _scores_np(scores)
    g = np.asarray(groups.cpu() if isinstance(groups, Tensor) else groups, dtype=np.int64)
    return float(s[g, np.arange(s.shape[1])].sum())


# ----------------------------------------------------------------------------- shared group


def shared_group(scores: Tensor | np.ndarray, m: int) -> Tensor:
    """The m neurons most widely useful across token clusters (Shared Neuron Group Retention).

    Every cluster nominates its top-m neurons (ties in score: lower index first). Nominees are
    ranked by how many clusters chose them, then by total score over all clusters, then by
    index; the first m form the shared group. Returned in that rank order, LongTensor [m].
    The union of nominations always holds >= m neurons, since one cluster alone nominates m.
    """
    s = _scores_np(scores)
    k, n = s.shape
    require(0 <= m <= n, f"shared group size m={m} must be in [0, {n}]")
    if m == 0:
        return torch.empty(0, dtype=torch.long)
    # stable sort of -s gives descending scores with ties broken by lower index
    top = np.argsort(-s, axis=1, kind="stable")[:, :m]
    counts = np.bincount(top.ravel(), minlength=n)
    total = s.sum(axis=0)
    idx = np.arange(n)
    # np.lexsort sorts by the last key first
    order = np.lexsort((idx, -total, -counts))
    chosen = order[:m]
    assert (counts[chosen] > 0).all()
    return torch.from_numpy(chosen.astype(np.int64))


# ------------------------------------------------------------------------------ assignments


def assign_groups_greedy(scores: Tensor | np.ndarray, capacities: Sequence[int]) -> Tensor:
    """Greedy assignment as in the official FANG code (for comparison with the exact solver).

    Repeatedly takes the largest remaining score S[g, j] over unassigned neurons j and groups g
    with room left and puts j in g; equivalently each neuron, once it is the best remaining
    candidate of some non-full group, goes there. Ties: lower group, then lower neuron index.
    O(k n log(k n)). Returns LongTensor [n] of group ids.
    """
    s = _scores_np(scores)
    k, n = s.shape
    caps = _check_capacities(capacities, k, n)
    return torch.from_numpy(_greedy(s, caps))


def _greedy(s: np.ndarray, caps: np.ndarray) -> np.ndarray:
    k, n = s.shape
    order = np.argsort(-s.ravel(), kind="stable")  # flat index g * n + j
    left = caps.copy()
    groups = np.full(n, -1, dtype=np.int64)
    placed = 0
    for flat in order.tolist():
        g, j = divmod(flat, n)
        if groups[j] < 0 and left[g] > 0:
            groups[j] = g
            left[g] -= 1
            placed += 1
            if placed == n:
                break
    return groups


def _move_costs(s: np.ndarray, groups: np.ndarray, big: float) -> tuple[np.ndarray, np.ndarray]:
    """W[a, b] = cheapest loss of moving one neuron from group a to b, and which neuron."""
    k, n = s.shape
    own = s[groups, np.arange(n)]
    loss = own[None, :] - s  # loss[b, j]: score lost if neuron j moves to group b
    w = np.full((k, k), big)
    who = np.zeros((k, k), dtype=np.int64)
    for a in range(k):
        members = np.flatnonzero(groups == a)
        if members.size == 0:
            continue
        sub = loss[:, members]
        best = sub.argmin(axis=1)
        w[a] = sub[np.arange(k), best]
        who[a] = members[best]
    np.fill_diagonal(w, big)
    return w, who


def _negative_cycle(w: np.ndarray, tol: float) -> list[int] | None:
    """A cycle of total weight < -tol in the dense digraph w (Bellman-Ford), or None."""
    k = w.shape[0]
    dist = np.zeros(k)  # as if a virtual source reached every node at cost 0
    pred = np.full(k, -1, dtype=np.int64)
    last = -1
    for _ in range(k):
        last = -1
        for a in range(k):
            cand = dist[a] + w[a]
            better = cand < dist - tol
            better[a] = False
            if better.any():
                dist[better] = cand[better]
                pred[better] = a
                last = int(np.flatnonzero(better)[-1])
        if last < 0:
            return None
    # still relaxing after k rounds: walking k predecessors back lands on a cycle
    node = last
    for _ in range(k):
        node = int(pred[node])
        if node < 0:
            raise FangError("internal error in the assignment solver: broken predecessor chain")
    cycle = [node]
    cur = int(pred[node])
    while cur != node:
        if cur < 0 or len(cycle) > k:
            raise FangError("internal error in the assignment solver: broken predecessor chain")
        cycle.append(cur)
        cur = int(pred[cur])
    cycle.reverse()  # now cycle[i] -> cycle[i + 1] follows the edges
    return cycle


def _cancel_cycles(s: np.ndarray, groups: np.ndarray, max_rounds: int) -> tuple[np.ndarray, int]:
    k, n = s.shape
    scale = float(np.abs(s).max()) or 1.0
    # a cycle must gain more than float noise, otherwise equal-score swaps could loop forever
    tol = 1e-12 * scale * k
    big = 1e6 * scale * (k + 1) + 1.0  # "no edge" (empty group), never part of a negative cycle
    for rounds in range(max_rounds):
        w, who = _move_costs(s, groups, big)
        cycle = _negative_cycle(w, tol)
        if cycle is None:
            return groups, rounds
        edges = list(zip(cycle, cycle[1:] + cycle[:1]))
        gain = -sum(w[a, b] for a, b in edges)
        if not gain > tol:  # cannot happen for a Bellman-Ford cycle; guard against an endless loop
            raise FangError(f"internal error in the assignment solver: cycle {cycle} does not improve the score")
        movers = [(int(who[a, b]), b) for a, b in edges]  # read all movers before moving any
        for j, b in movers:
            groups[j] = b
    raise FangError(f"assignment solver did not converge in {max_rounds} rounds; try solver='lsa'")


def _lsa(s: np.ndarray, caps: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    k, n = s.shape
    slot_group = np.repeat(np.arange(k), caps)  # one row per slot of each group
    rows, cols = linear_sum_assignment(-s[slot_group])
    groups = np.empty(n, dtype=np.int64)
    groups[cols] = slot_group[rows]
    return groups


def assign_groups_lap(scores: Tensor | np.ndarray, capacities: Sequence[int], solver: str = "cycles") -> Tensor:
    """Exact balanced assignment of neurons to k groups with the given sizes, maximising the
    total score sum_j S[group_j, j]. LongTensor [n] of group ids. See the module docstring for
    the two solvers: "cycles" (default, greedy + negative-cycle cancelling, fast for k << n) and
    "lsa" (scipy linear_sum_assignment on rows repeated to capacity, O(n^3))."""
    s = _scores_np(scores)
    k, n = s.shape
    caps = _check_capacities(capacities, k, n)
    require(solver in LAP_SOLVERS, f"unknown assignment solver {solver!r}: use one of {', '.join(LAP_SOLVERS)}")
    if solver == "lsa":
        return torch.from_numpy(_lsa(s, caps))
    groups, _ = _cancel_cycles(s, _greedy(s, caps), max_rounds=max(1000, 10 * n))
    return torch.from_numpy(groups)


def assign_groups_random(n_rest: int, capacities: Sequence[int], seed: int) -> Tensor:
    """Random assignment with the given group sizes (Table 6 "Random" grouping). LongTensor [n_rest]."""
    caps = _check_capacities(capacities, len(list(capacities)), n_rest)
    labels = np.repeat(np.arange(caps.size), caps)
    return torch.from_numpy(np.random.default_rng(seed).permutation(labels).astype(np.int64))


# --------------------------------------------------------------------------------- one layer


def shared_size(n: int, k: int, ratio: float = 1.0) -> int:
    """Neurons in the shared group when it is `ratio` times as large as each of the k functional groups:
    m = floor(ratio * n / (k + ratio)), at least 1; ratio 1 is the paper's m = N_n / (K + 1)."""
    require(ratio > 0.0, f"shared group ratio {ratio} must be > 0")
    if ratio == 1.0:
        return n // (k + 1)  # exact integer arithmetic for the paper's size
    return max(1, min(n - k, int(np.floor(ratio * n / (k + ratio)))))


def neuron_groups(
    scores: Tensor | np.ndarray, method: str = "lap", seed: int = 0, solver: str = "cycles",
    shared_ratio: float = 1.0,
) -> tuple[Tensor, dict[str, Any]]:
    """Shared + functional groups for one FFN layer from its score matrix S [k, n].

    Shared group size m = `shared_size(n, k, shared_ratio)` (paper, ratio 1: m = N_n / (K + 1)); the
    remaining n - m neurons form k functional groups whose sizes differ by at most 1. Returns group ids
    LongTensor [n] (0..k-1 functional, k shared) and an info dict with sizes and total scores.

    - "lap": shared group by `shared_group`, functional groups by the exact assignment; info
      also gives the greedy total on the same sub-problem (exact-vs-greedy gain).
    - "random": shared group and functional groups drawn at random from `seed` (Table 6).
    """
    s = _scores_np(scores)
    k, n = s.shape
    require(method in GROUP_METHODS, f"unknown grouping method {method!r}: use one of {', '.join(GROUP_METHODS)}")
    require(n >= k + 1, f"{n} neurons cannot form {k} functional groups plus a shared group (need at least {k + 1})")
    m = shared_size(n, k, shared_ratio)
    caps = balanced_sizes(n - m, k)

    if method == "lap":
        shared = shared_group(s, m).numpy()
    else:
        # own stream for the shared draw so it is independent of the group permutation below
        shared = np.random.default_rng((seed, 1)).permutation(n)[:m]
    is_shared = np.zeros(n, dtype=bool)
    is_shared[shared] = True
    rest = np.flatnonzero(~is_shared)
    sub = s[:, rest]

    info: dict[str, Any] = {"method": method, "k": k, "n": n, "shared_size": m, "group_sizes": caps}
    if method == "lap":
        sub_groups = assign_groups_lap(sub, caps, solver=solver).numpy()
        greedy = _greedy(sub, np.asarray(caps))
        total = float(sub[sub_groups, np.arange(rest.size)].sum())
        greedy_total = float(sub[greedy, np.arange(rest.size)].sum())
        info.update(
            solver=solver,
            total_score=total,
            greedy_total_score=greedy_total,
            # relative gain of the exact assignment over the official greedy one (>= 0)
            gain_over_greedy=(total - greedy_total) / abs(greedy_total) if greedy_total else 0.0,
        )
    else:
        sub_groups = assign_groups_random(rest.size, caps, seed).numpy()
        info.update(seed=seed, total_score=float(sub[sub_groups, np.arange(rest.size)].sum()))

    groups = np.full(n, k, dtype=np.int64)
    groups[rest] = sub_groups
    info["shared_score"] = float(s[:, shared].sum())  # summed over clusters: what the shared group keeps
    return torch.from_numpy(groups), info
