"""`fang inspect groups`: functional and shared neuron groups, their sizes, score mass and top neurons."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from rich.table import Table

from ...core import paths
from ...core.errors import require
from .common import _artifact, _layer_index, _num_column, _open, _table


@dataclass
class GroupInfo:
    group: int  # 0..k-1 functional (matched to the cluster of the same id), k = shared
    size: int
    tokens: Optional[int]  # calibration tokens of the matched cluster (functional groups)
    mass_share: float  # functional: share of S[g] held by the group; shared: share of all of S
    best_fit: Optional[float]  # functional: share of members whose highest-scoring cluster is g
    top: list[tuple[int, float]]  # (neuron, score): S[g, j] for functional, sum_c S[c, j] for shared


@dataclass
class LayerGroups:
    layer: int
    k: int
    n_neurons: int
    method: str
    functional: list[GroupInfo]
    shared: GroupInfo
    assigned_score: float  # sum over non-shared neurons of S[group_j, j]
    gain_over_greedy: Optional[float]  # from metrics/groups.json, when the exact solver ran


def _scores_and_groups(root: Path) -> tuple[Any, Any, int, str]:
    groups = _open(_artifact(root, paths.GROUPS), "groups", "group")
    taylor = _open(_artifact(root, paths.TAYLOR), "taylor", "taylor")
    n_layers, k, n = taylor["scores"].shape
    require(
        tuple(groups["neuron_groups"].shape) == (n_layers, n) and int(groups.attrs.get("k", k)) == k,
        f"{_artifact(root, paths.GROUPS)} does not match {_artifact(root, paths.TAYLOR)} "
        f"({tuple(groups['neuron_groups'].shape)} vs {n_layers} layers x {n} neurons, k={k}): rerun `dvc repro group`",
    )
    return taylor, groups, k, str(groups.attrs.get("method", "?"))


def _groups_metrics(root: Path) -> dict:
    # optional: only adds the exact-vs-greedy gain
    f = _artifact(root, paths.METRICS) / "groups.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return {}


def _summarise_layer(s: np.ndarray, g: np.ndarray, k: int, top: int, counts: Optional[np.ndarray]) -> tuple[list[GroupInfo], GroupInfo, float]:
    s = s.astype(np.float64)
    best = s.argmax(axis=0)
    functional = []
    for c in range(k):
        members = np.flatnonzero(g == c)
        own = s[c, members]
        order = members[np.argsort(-own, kind="stable")[:top]]
        row_total = s[c].sum()
        functional.append(GroupInfo(
            group=c, size=int(members.size),
            tokens=None if counts is None else int(counts[c]),
            mass_share=float(own.sum() / row_total) if row_total > 0 else 0.0,
            best_fit=float((best[members] == c).mean()) if members.size else 0.0,
            top=[(int(j), float(s[c, j])) for j in order],
        ))
    shared = np.flatnonzero(g == k)
    total = s.sum(axis=0)
    order = shared[np.argsort(-total[shared], kind="stable")[:top]]
    grand = total.sum()
    shared_info = GroupInfo(
        group=k, size=int(shared.size), tokens=None,
        mass_share=float(total[shared].sum() / grand) if grand > 0 else 0.0,
        best_fit=None, top=[(int(j), float(total[j])) for j in order],
    )
    rest = np.flatnonzero(g < k)
    assigned = float(s[g[rest], rest].sum())
    return functional, shared_info, assigned


def _layer_groups(taylor, groups, k: int, method: str, per_layer: list, layer: int, top: int) -> LayerGroups:
    counts = np.asarray(taylor["token_counts"][layer]) if "token_counts" in taylor else None
    functional, shared, assigned = _summarise_layer(
        np.asarray(taylor["scores"][layer]), np.asarray(groups["neuron_groups"][layer]), k, top, counts
    )
    gain = per_layer[layer].get("gain_over_greedy") if layer < len(per_layer) else None
    return LayerGroups(layer, k, int(taylor["scores"].shape[2]), method, functional, shared, assigned, gain)


def layer_groups(root: Path, layer: int, top: int = 5) -> LayerGroups:
    """One layer's groups: sizes, score mass, best-fit share and top neurons (negative layer counts from the end)."""
    taylor, groups, k, method = _scores_and_groups(root)
    layer = _layer_index(layer, taylor["scores"].shape[0])
    return _layer_groups(taylor, groups, k, method, _groups_metrics(root).get("layers", []), layer, top)


def all_layer_groups(root: Path, top: int = 5) -> list[LayerGroups]:
    taylor, groups, k, method = _scores_and_groups(root)
    per_layer = _groups_metrics(root).get("layers", [])
    return [_layer_groups(taylor, groups, k, method, per_layer, li, top) for li in range(taylor["scores"].shape[0])]


def _neurons(top: list[tuple[int, float]]) -> str:
    return "  ".join(f"{j}:{v:.3g}" for j, v in top)


def groups_overview_table(layers: list[LayerGroups]) -> Table:
    first = layers[0]
    table = _table(
        f"neuron groups per layer ({first.method}): {first.n_neurons} FFN neurons = k={first.k} functional groups + 1 shared",
        "mass: share of the Taylor score mass the shared group holds; best-fit: mean share of functional-group "
        "neurons whose highest-scoring cluster is their own group's",
    )
    for name in ("layer", "shared", "functional sizes", "assigned score", "gain vs greedy", "shared mass", "best-fit"):
        _num_column(table, name)
    for lg in layers:
        sizes = [g.size for g in lg.functional]
        table.add_row(
            str(lg.layer), str(lg.shared.size),
            f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}",
            f"{lg.assigned_score:.4g}",
            "-" if lg.gain_over_greedy is None else f"{lg.gain_over_greedy:+.2%}",
            f"{lg.shared.mass_share:.1%}",
            f"{np.mean([g.best_fit for g in lg.functional]):.1%}",
        )
    return table


def groups_layer_table(lg: LayerGroups) -> Table:
    table = _table(
        f"layer {lg.layer}: neuron groups ({lg.method}), top neurons as neuron:score",
        "functional group g is matched to token cluster g; its neurons ranked by S[g, j]. "
        "Shared group ranked by the score summed over all clusters. mass: share of the cluster's "
        "score row (shared: of all of S) the group holds; best-fit: members whose top cluster is g",
    )
    table.add_column("group", justify="right", no_wrap=True)
    for header in ("size", "tokens", "mass", "best-fit"):
        _num_column(table, header)
    table.add_column(f"top {max((len(g.top) for g in [*lg.functional, lg.shared]), default=0)} neurons", overflow="fold")
    for g in lg.functional:
        table.add_row(f"g{g.group}", str(g.size), "-" if g.tokens is None else f"{g.tokens:,}",
                      f"{g.mass_share:.1%}", f"{g.best_fit:.0%}", _neurons(g.top))
    sh = lg.shared
    table.add_row("shared", str(sh.size), "all", f"{sh.mass_share:.1%}", "-", _neurons(sh.top), style="bold")
    return table
