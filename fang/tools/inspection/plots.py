"""PNG plots of the `fang inspect` views (--png)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .clusters import ClusterStats
from .common import _layer_index, _save
from .groups import _scores_and_groups
from .sparsity import Allocation


def plot_cluster_sizes(stats: ClusterStats, out_dir: Path) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    frac = stats.sizes / stats.n_tokens
    fig = Figure(figsize=(max(4.0, 0.7 * stats.k + 2), max(3.0, 0.28 * stats.n_layers + 1.5)))
    ax = fig.add_subplot()
    im = ax.imshow(frac, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("cluster (ids are per layer)")
    ax.set_ylabel("layer")
    ax.set_xticks(range(stats.k))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"token share per cluster (k={stats.k}, {stats.n_tokens:,} tokens)")
    if frac.size <= 400:  # numbers stay readable up to ~40 layers x 10 clusters
        for (li, c), v in np.ndenumerate(frac):
            ax.text(c, li, f"{v:.0%}", ha="center", va="center", fontsize=6,
                    color="white" if v < frac.max() * 0.6 else "black")
    fig.colorbar(im, ax=ax, label="share of calibration tokens")
    return _save(fig, Path(out_dir) / "cluster_sizes.png")


def plot_sparsity(a: Allocation, out_dir: Path) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    x = np.arange(len(a.fc))
    fig = Figure(figsize=(8, 5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.bar(x, a.fc, color="tab:purple")
    top.set_ylabel("functional complexity")
    top.set_title(f"per-block allocation ({a.mode}), target sparsity {a.target:.2f}")
    bottom.plot(x, a.attn, "o-", label="attention", color="tab:blue")
    bottom.plot(x, a.ffn, "s--", label="FFN", color="tab:orange")
    bottom.axhline(a.target, color="gray", lw=1, ls=":", label="target")
    bottom.set_xlabel("layer")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_ylabel("sparsity")
    bottom.legend(fontsize=8)
    return _save(fig, Path(out_dir) / "sparsity_by_layer.png")


def plot_scores(root: Path, layer: int, out_dir: Path) -> Path:
    """S of one layer [k, n], neurons sorted by group (functional 0..k-1, then shared), then by score."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    taylor, groups, k, method = _scores_and_groups(root)
    layer = _layer_index(layer, taylor["scores"].shape[0])
    s = np.asarray(taylor["scores"][layer], dtype=np.float64)
    g = np.asarray(groups["neuron_groups"][layer])
    # within a functional group by its own cluster's score; shared by the total over clusters
    key = np.where(g < k, s[np.minimum(g, k - 1), np.arange(g.size)], s.sum(axis=0))
    order = np.lexsort((-key, g))
    sorted_s = s[:, order]
    positive = sorted_s[sorted_s > 0]
    # Taylor scores span orders of magnitude: a log colour scale keeps the small ones visible
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    fig = Figure(figsize=(11, 0.35 * k + 2))
    ax = fig.add_subplot()
    im = ax.imshow(np.where(sorted_s > 0, sorted_s, np.nan), aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
    bounds = np.cumsum(np.bincount(g, minlength=k + 1))
    for b in bounds[:-1]:
        ax.axvline(b - 0.5, color="cyan", lw=0.8)
    mids = (np.concatenate([[0], bounds[:-1]]) + bounds) / 2
    ax.set_xticks(mids, [f"g{c}" for c in range(k)] + ["shared"], fontsize=7)
    ax.set_yticks(range(k), [f"c{c}" for c in range(k)])
    ax.set_ylabel("token cluster")
    ax.set_xlabel("FFN neurons, sorted by group")
    ax.set_title(f"layer {layer}: Taylor scores S (Eq. 5), groups by {method}")
    fig.colorbar(im, ax=ax, label="S (log scale)")
    return _save(fig, Path(out_dir) / f"scores_layer{layer}.png")
