"""Paired comparisons of two pruned models evaluated on the same questions and text windows.

Two models answering the same questions are strongly correlated: their accuracies' standard
errors overlap even when one is better on almost every question both can tell apart. Comparing
them paired (the difference per question, or per perplexity window, resampled together) is what
resolves a difference of a few points. Everything here is a paired percentile bootstrap with a
fixed seed, so a report is reproducible to the digit.

A verdict is read from the 95% interval only: "better" or "worse" when it excludes zero, "no
detectable difference" otherwise, never from two means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..core.errors import FangError, require

N_BOOT = 4000  # bootstrap resamples; the interval ends move by < 0.1 point between seeds at this size
SEED = 0
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"


@dataclass(frozen=True)
class Comparison:
    """Estimate of B - A (accuracy, in fractions) or B / A - 1 (perplexity) with a 95% interval."""

    estimate: float
    low: float
    high: float
    n: int  # paired units: questions or windows
    higher_is_better: bool

    @property
    def verdict(self) -> str:
        if self.low > 0:
            return BETTER if self.higher_is_better else WORSE
        if self.high < 0:
            return WORSE if self.higher_is_better else BETTER
        return NO_DIFFERENCE

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n,
                "verdict": self.verdict}


def _interval(samples: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def _aligned(a: Mapping, b: Mapping, metric: str, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-question scores of both models on the questions both answered, matched by doc id."""
    for name, side in (("A", a), ("B", b)):
        require(metric in side and "doc_id" in side,
                f"task {task}: model {name} has no per-question {metric!r} (evaluate again with this fang)")
    ia = {d: i for i, d in enumerate(a["doc_id"])}
    common = [d for d in b["doc_id"] if d in ia]
    require(common, f"task {task}: the two models answered no common question")
    ib = {d: i for i, d in enumerate(b["doc_id"])}
    xa = np.array([a[metric][ia[d]] for d in common], dtype=np.float64)
    xb = np.array([b[metric][ib[d]] for d in common], dtype=np.float64)
    return xa, xb


def accuracy_difference(
    per_task_a: Mapping[str, Mapping], per_task_b: Mapping[str, Mapping], metric_of: Mapping[str, str],
    n_boot: int = N_BOOT, seed: int = SEED,
) -> dict[str, Comparison]:
    """B - A accuracy per task and for the unweighted mean over tasks ("average").

    `per_task_*[task]` is evaluate's `per_example` ({"doc_id", "acc", "acc_norm"}), `metric_of[task]`
    the metric the report shows for it. Questions are resampled within each task, the same
    resample for both models; the average's interval resamples every task at once.
    """
    require(len(per_task_a) > 0, "accuracy_difference: no task given")
    rng = np.random.default_rng(seed)
    out: dict[str, Comparison] = {}
    boot_means = []
    for task in sorted(per_task_a):
        require(task in per_task_b, f"task {task}: model B was not evaluated on it")
        xa, xb = _aligned(per_task_a[task], per_task_b[task], metric_of[task], task)
        d = xb - xa
        idx = rng.integers(0, d.size, size=(n_boot, d.size))
        boot = d[idx].mean(1)
        boot_means.append(boot)
        out[task] = Comparison(float(d.mean()), *_interval(boot), d.size, higher_is_better=True)
    avg_boot = np.mean(boot_means, axis=0)
    estimate = float(np.mean([c.estimate for c in out.values()]))
    out["average"] = Comparison(estimate, *_interval(avg_boot), sum(c.n for c in out.values()), True)
    return out


def perplexity_ratio(
    nll_a: Sequence[float], nll_b: Sequence[float], tokens_per_window: int,
    n_boot: int = N_BOOT, seed: int = SEED,
) -> Comparison:
    """PPL_B / PPL_A - 1 over the same windows (negative = B has lower perplexity = better).

    PPL = exp(total NLL / total tokens); windows are resampled together for both models.
    """
    a = np.asarray(nll_a, dtype=np.float64)
    b = np.asarray(nll_b, dtype=np.float64)
    require(a.size == b.size and a.size > 0,
            f"perplexity_ratio: {a.size} and {b.size} windows: the models were not evaluated on the same windows")
    require(tokens_per_window > 0, "perplexity_ratio: tokens_per_window must be positive")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    # equal tokens per window: log(PPL_B / PPL_A) = mean over windows of (nll_b - nll_a) / tokens
    d = (b - a) / tokens_per_window
    boot = np.expm1(d[idx].mean(1))
    return Comparison(float(math.expm1(d.mean())), *_interval(boot), a.size, higher_is_better=False)


def perplexity_differences(
    windows_a: Mapping, windows_b: Mapping, topics: Sequence[str] | None = None, seed: int = SEED,
) -> dict[str, Comparison]:
    """Per topic and "overall" (all windows pooled) perplexity ratios from evaluate's `ppl_windows`."""
    for name, w in (("A", windows_a), ("B", windows_b)):
        if not w or "nll" not in w:
            raise FangError(f"model {name} has no per-window perplexity (evaluate again with this fang)")
    tokens = int(windows_a["tokens_per_window"])
    require(tokens == int(windows_b["tokens_per_window"]), "the two models were evaluated with different window lengths")
    topics = sorted(windows_a["nll"]) if topics is None else list(topics)
    out = {t: perplexity_ratio(windows_a["nll"][t], windows_b["nll"][t], tokens, seed=seed) for t in topics}
    pooled_a = [v for t in topics for v in windows_a["nll"][t]]
    pooled_b = [v for t in topics for v in windows_b["nll"][t]]
    out["overall"] = perplexity_ratio(pooled_a, pooled_b, tokens, seed=seed)
    return out


def bootstrap(
    stat: Callable[[dict[str, np.ndarray]], float], sizes: Mapping[str, int], higher_is_better: bool,
    n_boot: int = N_BOOT, seed: int = SEED,
) -> Comparison:
    """Percentile interval of any statistic of several paired unit sets resampled together.

    `sizes[key]` is the number of units (windows of a topic, questions of a task) in set `key`;
    `stat(indices)` computes the statistic from one index array per set. Every model the statistic
    compares is resampled with the same indices, which is what keeps the comparison paired, also
    across calibration sources evaluated on the same windows and questions.
    """
    require(sizes and all(n > 0 for n in sizes.values()), f"bootstrap: every unit set needs units, got {dict(sizes)}")
    rng = np.random.default_rng(seed)
    estimate = float(stat({k: np.arange(n) for k, n in sizes.items()}))
    samples = np.empty(n_boot)
    for i in range(n_boot):
        samples[i] = stat({k: rng.integers(0, n, n) for k, n in sizes.items()})
    return Comparison(estimate, *_interval(samples), int(sum(sizes.values())), higher_is_better)


# ---------------------------------------------------------------------------- sizes by power


def difference_variance(a: Mapping, b: Mapping, metric: str, task: str = "") -> float:
    """Variance of the per-question difference B - A (in fractions²) on the questions both answered:
    for 0/1 scores, about the share of questions the two models disagree on."""
    xa, xb = _aligned(a, b, metric, task)
    return float(np.var(xb - xa, ddof=1)) if xa.size > 1 else 0.0


def average_halfwidth(variance: Mapping[str, float], n: Mapping[str, int]) -> float:
    """Half-width of the 95% interval of the mean over tasks of per-task mean differences, with `n[task]`
    questions each (normal approximation of the paired bootstrap `accuracy_difference` runs)."""
    require(variance and all(n.get(t, 0) > 0 for t in variance), "average_halfwidth: every task needs questions")
    return 1.96 * math.sqrt(sum(v / n[t] for t, v in variance.items())) / len(variance)


def limit_for_halfwidth(variance: Mapping[str, float], available: Mapping[str, int], target: float) -> int | None:
    """The smallest per-task limit L (lm-eval's `limit`: the first L questions of every task, all of a
    smaller task) whose interval half-width on the average is <= `target`; None if even every question
    of every task does not reach it."""
    def width(limit: int) -> float:
        return average_halfwidth(variance, {t: min(limit, available[t]) for t in variance})

    top = max(available[t] for t in variance)
    if width(top) > target:
        return None
    lo, hi = 1, top
    while lo < hi:
        mid = (lo + hi) // 2
        if width(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return lo
