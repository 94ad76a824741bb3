"""What pruning took away, against what it cost: per topic, the share of its selective neurons (and of its
activation mass) a pruned model removed (`fang.analysis.attribute`, `fang attribute-removed`), correlated
across topics with the model's perplexity increase; the report's section, table and plot of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..core.atomic import read_json
from ..core.errors import require


def fisher_interval(r: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Fisher-z interval of a Pearson r from n independent pairs (NaN below 4 pairs)."""
    from scipy.stats import norm

    if n < 4 or not np.isfinite(r):
        return math.nan, math.nan
    z, half = np.arctanh(np.clip(r, -0.999999, 0.999999)), norm.ppf(0.5 + level / 2) / math.sqrt(n - 3)
    return float(np.tanh(z - half)), float(np.tanh(z + half))


def _pooled_r(x: np.ndarray, y: np.ndarray) -> float:
    # centring within each cell keeps differences between models (sparsity, calibration) out of r
    xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    den = math.sqrt(float((xc**2).sum() * (yc**2).sum()))
    return float((xc * yc).sum() / den) if den > 0 else math.nan


def topic_correlation(x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Correlation across topics between x and y [cells, topics], centred within each cell.

    One cell (one pruned model) gives the plain Pearson r, with a Fisher interval; several cells
    (e.g. a method's models across sparsities and calibration sources) share the topics, so the
    bootstrap resamples topics (columns), the same ones in every cell. Topics with a NaN in any
    cell are dropped first.
    """
    x, y = np.atleast_2d(np.asarray(x, dtype=np.float64)), np.atleast_2d(np.asarray(y, dtype=np.float64))
    require(x.shape == y.shape, f"correlation needs x and y of one shape, got {x.shape} and {y.shape}")
    ok = np.isfinite(x).all(0) & np.isfinite(y).all(0)
    x, y = x[:, ok], y[:, ok]
    n = int(ok.sum())
    out = {"r": math.nan, "low": math.nan, "high": math.nan, "fisher_low": math.nan, "fisher_high": math.nan,
           "topics": n, "cells": int(x.shape[0]), "level": level}
    if n < 3:
        return out
    out["r"] = _pooled_r(x, y)
    if x.shape[0] == 1:
        out["fisher_low"], out["fisher_high"] = fisher_interval(out["r"], n, level)
    rng = np.random.default_rng(seed)
    boots = np.array([_pooled_r(x[:, idx], y[:, idx]) for idx in rng.integers(0, n, size=(n_boot, n))])
    boots = boots[np.isfinite(boots)]
    if boots.size:
        out["low"], out["high"] = (float(v) for v in np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]))
    return out


def removal_result(model: str, kept_from: str, topics: Sequence[str], removed: np.ndarray,
                   by_topic: Mapping[str, np.ndarray], ppl_by_topic: Mapping[str, float] | None = None,
                   dense_ppl_by_topic: Mapping[str, float] | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """`fang attribute-removed`'s result for one pruned model: per topic its selective neurons, how many of
    them the model removed and the activation mass it lost (`by_topic`: `removal_by_topic` of `removed`
    [layers, n_ffn]), and the neurons removed per layer. Given the model's and the dense model's perplexity
    by topic, also log(PPL / PPL_dense) per topic and its correlation across topics with each measure."""
    r = by_topic
    result = {
        "model": model, "kept_from": kept_from, "removed_fraction": float(r["removed_fraction"]),
        "topics": {t: {"selective": int(r["selective"][k]), "selective_removed": int(r["selective_removed"][k]),
                       "selective_removed_fraction": None if np.isnan(r["selective_removed_fraction"][k])
                       else float(r["selective_removed_fraction"][k]),
                       "mass_lost": float(r["mass_lost"][k])} for k, t in enumerate(topics)},
        "removed_by_layer": [int(v) for v in removed.sum(1)],
    }
    if ppl_by_topic is not None and dense_ppl_by_topic is not None:
        ppl, dense = ppl_by_topic, dense_ppl_by_topic
        y = np.array([[np.log(ppl[t] / dense[t]) if t in ppl and t in dense else np.nan for t in topics]])
        result["ppl_log_ratio"] = {t: float(v) for t, v in zip(topics, y[0]) if np.isfinite(v)}
        result["correlation"] = {
            what: topic_correlation(np.array([[np.nan if v is None else v for v in
                                               (result["topics"][t][key] for t in topics)]], dtype=float), y,
                                    n_boot=n_boot, seed=seed)
            for what, key in (("removed", "selective_removed_fraction"), ("mass_lost", "mass_lost"))}
    return result


@dataclass
class CellRemoval:
    """One pruned model of the bias study: its per-topic removal and perplexity increase over dense."""

    method: str
    source: str
    sparsity: float
    removed: Mapping[str, float]  # topic -> fraction of its selective neurons removed
    mass_lost: Mapping[str, float]  # topic -> share of its activation mass removed
    increase: Mapping[str, float]  # topic -> PPL / PPL_dense - 1


def read_cell_removal(path, method: str, source: str, sparsity: float,
                      increase: Mapping[str, float]) -> CellRemoval | None:
    """The CellRemoval of one pruned model from its `fang attribute-removed` JSON (None when it has none)."""
    if not Path(path).exists():
        return None
    topics = read_json(path)["topics"]
    return CellRemoval(method, source, sparsity, {t: v["selective_removed_fraction"] for t, v in topics.items()},
                       {t: v["mass_lost"] for t, v in topics.items()}, increase)


def removal_correlations(cells: Sequence[CellRemoval], topics: Sequence[str], n_boot: int = 2000, seed: int = 0) -> dict:
    """Per method (its models pooled, centred per model) and per model: correlation across topics
    between removal (selective fraction; lost mass) and log(PPL / PPL_dense)."""
    def arrays(group: Sequence[CellRemoval], what: str) -> tuple[np.ndarray, np.ndarray]:
        x = np.array([[getattr(c, what).get(t, np.nan) for t in topics] for c in group], dtype=np.float64)
        y = np.array([[math.log1p(c.increase[t]) if c.increase.get(t) is not None else np.nan for t in topics]
                      for c in group], dtype=np.float64)
        return x, y

    def both(group: Sequence[CellRemoval]) -> dict:
        return {what: topic_correlation(*arrays(group, what), n_boot=n_boot, seed=seed)
                for what in ("removed", "mass_lost")}

    methods = list(dict.fromkeys(c.method for c in cells))
    return {
        "topics": list(topics),
        "methods": [{"method": m, "models": sum(c.method == m for c in cells),
                     **both([c for c in cells if c.method == m])} for m in methods],
        "cells": [{"method": c.method, "source": c.source, "sparsity": c.sparsity, **both([c])} for c in cells],
    }


def _interval(c: dict) -> str:
    if not np.isfinite(c["r"]):
        return "—"
    return f"{c['r']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"


def removal_markdown(section: dict | None, per_cell: bool = True) -> list[str]:
    """Markdown lines of the attribution section of a report; [] when no model was attributed.
    `per_cell=False` keeps the per-method table only (for a block of docs/results.md)."""
    if not section or not section["methods"]:
        return []
    from ..core.markdown import markdown_table

    rows = [[m["method"], str(m["models"]), str(m["removed"]["topics"]), _interval(m["removed"]), _interval(m["mass_lost"])]
            for m in section["methods"]]
    cells = [[c["method"], c["source"], f"{c['sparsity']:.0%}", _interval(c["removed"]), _interval(c["mass_lost"])]
             for c in section["cells"]]
    return ["### Does losing a topic's neurons predict losing the topic?", "",
            "Across topics, the correlation between the share of a topic's selective neurons a model removed (or the "
            "share of its activation mass) and log(PPL / PPL_dense) on that topic (`fang attribute`, docs/studies.md "
            "\"Neuron attribution\"). Per method its models are pooled, each centred on its own mean; r [95% bootstrap "
            "interval over topics].", "",
            markdown_table(["method", "models", "topics", "r, selective neurons removed", "r, activation mass lost"], rows),
            "", *([markdown_table(["method", "source", "sparsity", "r, selective removed", "r, mass lost"], cells), ""]
                  if per_cell else [])]


def plot_removal_correlation(section: dict, cells: Sequence[CellRemoval], path) -> None:
    """PNG: per method, log PPL ratio against the removed fraction of each topic's selective neurons."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = [m["method"] for m in section["methods"]]
    fig = Figure(figsize=(3.2 * max(1, len(methods)), 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(methods)), squeeze=False)[0]
    for ax, m in zip(axes, section["methods"]):
        for c in (c for c in cells if c.method == m["method"]):
            ts = [t for t in section["topics"] if c.removed.get(t) is not None and c.increase.get(t) is not None]
            ax.plot([c.removed[t] for t in ts], [math.log1p(c.increase[t]) for t in ts], "o", ms=3,
                    label=f"{c.source} {c.sparsity:.0%}")
        ax.set_title(f"{m['method']}: r = {_interval(m['removed'])}", fontsize=8)
        ax.set_xlabel("selective neurons removed (fraction)", fontsize=8)
        ax.set_ylabel("log(PPL / PPL_dense)", fontsize=8)
        ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
