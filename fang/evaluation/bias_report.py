"""Calibration-bias report: how much a pruned model's perplexity rises over dense on every topic,
depending on the topic its calibration set came from (the experiment of the seed's Table 8).

For a model calibrated on topic T, T's held-out test articles are in-distribution (ID) and every
other topic is out-of-distribution (OOD). Perplexities are compared with the dense model's on the
same windows, so a cell is the relative increase PPL / PPL_dense - 1 (in %). OOD is the geometric
mean of the other topics' PPL / PPL_dense (perplexity is multiplicative, so topics with a high
dense perplexity do not dominate), and OOD/ID = (PPL/PPL_dense)_OOD / (PPL/PPL_dense)_ID: above 1,
the pruned model lost more where it was not calibrated. The "all" source calibrates on every
topic; it has no OOD topics and serves as the unbiased reference.

Missing runs (failed or not run) are listed as such in every table, never dropped.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import removal
from ..core.errors import FangError, require
from ..core.markdown import markdown_table
from ..core.params import ALL_TOPICS
from .paired import bootstrap
from .report import (
    average,
    comparison_pairs,
    fmt_accuracy,
    fmt_comparison,
    headline_tasks,
    paired_examples,
    pair_verdict_lines,
    task_accuracy,
    verdict_word,
)


@dataclass
class BiasRun:
    source: str  # "all" or the calibration topic
    method: str
    sparsity: float
    metrics: dict | None  # evaluate's JSON; None when the run is missing
    prune: dict | None = None  # prune report (achieved sparsity)

    @property
    def label(self) -> str:
        return f"{self.method} / {self.source}"


def topic_increase(ppl_by_topic: dict[str, float], dense_by_topic: dict[str, float]) -> dict[str, float]:
    """PPL / PPL_dense - 1 per topic both have."""
    return {t: ppl_by_topic[t] / dense_by_topic[t] - 1.0 for t in dense_by_topic if t in ppl_by_topic}


def _geo_mean_ratio(increase: dict[str, float], topics: list[str]) -> float | None:
    if not topics:
        return None
    return math.exp(sum(math.log1p(increase[t]) for t in topics) / len(topics)) - 1.0


def id_ood(run: BiasRun, dense: dict) -> dict:
    """ID increase, OOD increase (geometric mean over the other topics) and OOD/ID ratio of one run."""
    inc = topic_increase(run.metrics["ppl_by_topic"], dense["ppl_by_topic"])
    if run.source == ALL_TOPICS:
        # calibrated on everything: ID is the whole test split, and there is nothing out of distribution
        return {"id": run.metrics["ppl"] / dense["ppl"] - 1.0, "ood": None, "ood_id_ratio": None, "by_topic": inc}
    if run.source not in inc:
        raise ValueError(f"no test perplexity for the calibration topic {run.source!r}; topics: {sorted(inc)}")
    ood = _geo_mean_ratio(inc, [t for t in inc if t != run.source])
    id_ = inc[run.source]
    ratio = None if ood is None else (1.0 + ood) / (1.0 + id_)
    return {"id": id_, "ood": ood, "ood_id_ratio": ratio, "by_topic": inc}


def _mean_over_sources(values: list[tuple[float, float | None]]) -> tuple[float | None, float | None]:
    """Mean of per-source accuracies and a standard error that does not assume independence.

    Every source's model answers the same questions, so their sampling errors are correlated and
    sqrt(sum se^2) / n would understate the error of the mean; the mean of the standard errors is
    its upper bound (perfectly correlated errors).
    """
    if not values:
        return None, None
    mean = sum(v for v, _ in values) / len(values)
    ses = [se for _, se in values]
    return mean, (sum(ses) / len(ses) if all(se is not None for se in ses) else None)


def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    mean, sd = _mean_sd(values)
    return mean, None if sd is None else sd / math.sqrt(len(values))


def _aligned_questions(examples: list[tuple[dict, dict]], metric_of: dict[str, str]) -> dict[str, list[np.ndarray]]:
    """Per task, one per-question score array per model (in the order of `examples`' flattened
    pairs), on the questions every model answered, matched by doc id."""
    out = {}
    models = [m for pair in examples for m in pair]
    for task in sorted(set.intersection(*(set(m) for m in models))):
        metric = metric_of[task]
        common = set.intersection(*(set(m[task]["doc_id"]) for m in models))
        if not common:
            continue
        ids = sorted(common)
        arrays = []
        for m in models:
            pos = {d: i for i, d in enumerate(m[task]["doc_id"])}
            arrays.append(np.array([m[task][metric][pos[d]] for d in ids], dtype=np.float64))
        out[task] = arrays
    return out


def compare_sources(pairs: dict[str, tuple[BiasRun, BiasRun]]) -> dict:
    """FANG (second of each pair) against its baseline (first) over calibration sources, paired twice:
    by source, and by evaluation window and question (the same resample for every source and model).

    Perplexity statistics are geometric means over the single-topic sources of PPL_FANG / PPL_base
    on that source's OOD topics (every other topic), on its own topic (ID), and their quotient
    (OOD ratio / ID ratio: below 0 = FANG loses less off-topic, relative to on-topic, than the
    baseline). Accuracy: mean over every source of the FANG - baseline average accuracy.
    Intervals are conditional on these calibration sets (they resample evaluation data, not sources).
    """
    windows = {}
    for src, (a, b) in pairs.items():
        wa, wb = a.metrics.get("ppl_windows"), b.metrics.get("ppl_windows")
        if not wa or not wb:
            raise FangError(f"{b.label} or {a.label} has no per-window perplexity (evaluate again with this fang)")
        windows[src] = ({t: np.asarray(v) for t, v in wa["nll"].items()}, {t: np.asarray(v) for t, v in wb["nll"].items()})
        tpw = int(wa["tokens_per_window"])
    topics = sorted(next(iter(windows.values()))[0])
    sizes = {t: len(next(iter(windows.values()))[0][t]) for t in topics}
    single = [s for s in pairs if s != ALL_TOPICS]
    missing = [s for s in single if s not in topics]
    require(not missing, f"calibration source(s) {missing} have no test windows; topics: {topics}")

    def log_ratio(src: str, subset: list[str], idx: dict[str, np.ndarray]) -> float:
        wa, wb = windows[src]
        d = sum(float(wb[t][idx[t]].sum() - wa[t][idx[t]].sum()) for t in subset)
        return d / (sum(len(idx[t]) for t in subset) * tpw)

    def over_single(fn) -> float:
        return math.expm1(float(np.mean([fn(s) for s in single])))

    out: dict = {"single_topic_sources": len(single)}
    if single:
        ood = {s: [t for t in topics if t != s] for s in single}
        out["ood_ppl_vs_baseline"] = bootstrap(
            lambda idx: over_single(lambda s: log_ratio(s, ood[s], idx)), sizes, False).as_dict()
        out["id_ppl_vs_baseline"] = bootstrap(
            lambda idx: over_single(lambda s: log_ratio(s, [s], idx)), sizes, False).as_dict()
        out["ood_id_gap_vs_baseline"] = bootstrap(
            lambda idx: over_single(lambda s: log_ratio(s, ood[s], idx) - log_ratio(s, [s], idx)), sizes, False).as_dict()
    if ALL_TOPICS in pairs:
        out["all_topics_ppl_vs_baseline"] = bootstrap(
            lambda idx: math.expm1(log_ratio(ALL_TOPICS, topics, idx)), sizes, False).as_dict()
    examples, metric_of = [], {}
    for a, b in pairs.values():
        ex_a, m_a = paired_examples(a.metrics)
        ex_b, _ = paired_examples(b.metrics)
        examples.append((ex_a, ex_b))
        metric_of.update(m_a)
    questions = _aligned_questions(examples, metric_of)
    if questions:
        n_src = len(examples)

        def acc_diff(idx: dict[str, np.ndarray]) -> float:
            per_source = []
            for k in range(n_src):
                per_source.append(np.mean([q[2 * k + 1][idx[t]].mean() - q[2 * k][idx[t]].mean()
                                           for t, q in questions.items()]))
            return float(np.mean(per_source))

        out["avg_acc_diff"] = bootstrap(acc_diff, {t: len(q[0]) for t, q in questions.items()}, True).as_dict()
    return out


def paired_comparisons(runs: list[BiasRun]) -> list[dict]:
    """Every FANG variant against every row of its base method at each sparsity (`compare_sources`)."""
    methods = list(dict.fromkeys(r.method for r in runs))
    by = {(r.method, r.source, r.sparsity): r for r in runs if r.metrics is not None}
    out = []
    for fang, base in comparison_pairs(methods):
        for sp in dict.fromkeys(r.sparsity for r in runs if r.method == fang):
            pairs = {src: (by[(base, src, sp)], by[(fang, src, sp)])
                     for (m, src, p) in by if m == fang and p == sp and (base, src, sp) in by}
            if not pairs:
                continue
            row = {"method": fang, "baseline": base, "sparsity": sp, "sources": sorted(pairs)}
            try:
                row.update(compare_sources(pairs))
            except FangError as exc:  # metrics from before per-window / per-question scores were kept
                row["error"] = str(exc)
            out.append(row)
    return out


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, sd


def analyse(runs: list[BiasRun], dense: dict) -> dict:
    """Per-run records and per (method, sparsity) summaries over the single-topic sources."""
    topics = sorted(dense["ppl_by_topic"])
    records = []
    for run in runs:
        rec = {"method": run.method, "source": run.source, "sparsity": run.sparsity}
        if run.metrics is None:
            records.append({**rec, "status": "missing"})
            continue
        stats = id_ood(run, dense)
        tasks = headline_tasks(run.metrics)
        avg, avg_se = average([task_accuracy(run.metrics["tasks"][t]) for t in tasks])
        records.append({
            **rec, "status": "ok",
            "achieved_sparsity": run.prune["achieved_sparsity"] if run.prune else None,
            "ppl": run.metrics["ppl"], "id_increase": stats["id"], "ood_increase": stats["ood"],
            "ood_id_ratio": stats["ood_id_ratio"], "avg_acc": avg, "avg_acc_stderr": avg_se,
            "increase_by_topic": {t: stats["by_topic"].get(t) for t in topics},
        })
    summaries = []
    for method, sparsity in dict.fromkeys((r.method, r.sparsity) for r in runs):
        mine = [r for r in records if r["method"] == method and r["sparsity"] == sparsity]
        single = [r for r in mine if r["source"] != ALL_TOPICS and r["status"] == "ok"]
        ood_mean, ood_sd = _mean_sd([r["ood_increase"] for r in single])
        ratio_mean, ratio_sd = _mean_sd([r["ood_id_ratio"] for r in single])
        acc_mean, acc_se = _mean_over_sources([(r["avg_acc"], r["avg_acc_stderr"]) for r in single if r["avg_acc"] is not None])
        ref = next((r for r in mine if r["source"] == ALL_TOPICS and r["status"] == "ok"), None)
        summaries.append({
            "method": method, "sparsity": sparsity, "sources": len(single),
            "missing": [r["source"] for r in mine if r["status"] == "missing"],
            "ood_increase_mean": ood_mean, "ood_increase_sd": ood_sd,
            "ood_id_ratio_mean": ratio_mean, "ood_id_ratio_sd": ratio_sd,
            "avg_acc_mean": acc_mean, "avg_acc_stderr": acc_se,
            "all_topics_increase": ref["id_increase"] if ref else None,
            "all_topics_avg_acc": ref["avg_acc"] if ref else None,
            "all_topics_avg_acc_stderr": ref["avg_acc_stderr"] if ref else None,
        })
    return {"topics": topics, "records": records, "summaries": summaries, "comparisons": paired_comparisons(runs)}


def _pct(v: float | None, sd: float | None = None) -> str:
    if v is None:
        return "—"
    return f"{v * 100:+.1f}%" + (f" ± {sd * 100:.1f}" if sd is not None else "")


def _ratio(v: float | None, sd: float | None = None) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def _intro(result: dict, dense: dict) -> list[str]:
    md = [f"Dense model: PPL {dense['ppl']:.2f} on the whole test split. A cell is PPL / PPL_dense - 1 on that topic's "
          "test articles; ID = the calibration topic, OOD = geometric mean over the other topics, "
          "OOD/ID = (1 + OOD) / (1 + ID). Avg acc = mean zero-shot accuracy over the dev tasks, ± standard error. "
          "Source `all` calibrates on every topic (the unbiased reference).", ""]
    missing = [r for r in result["records"] if r["status"] == "missing"]
    if missing:
        md += ["**Missing runs** (failed or not run; shown as missing below): "
               + ", ".join(f"{r['method']} / {r['source']} / {r['sparsity']:.0%}" for r in missing), ""]
    return md


def summary_table(result: dict) -> str:
    """Per method x sparsity: single-topic calibration (mean ± sd across sources) against all-topic calibration."""
    header = ["method", "sparsity", "sources", "OOD increase", "OOD/ID", "Avg acc (single-topic)",
              "all-topics PPL increase", "Avg acc (all topics)"]
    rows = []
    for s in result["summaries"]:
        n = f"{s['sources']}" + (f" ({len(s['missing'])} missing)" if s["missing"] else "")
        rows.append([s["method"], f"{s['sparsity']:.0%}", n, _pct(s["ood_increase_mean"], s["ood_increase_sd"]),
                     _ratio(s["ood_id_ratio_mean"], s["ood_id_ratio_sd"]), fmt_accuracy(s["avg_acc_mean"], s["avg_acc_stderr"]),
                     _pct(s["all_topics_increase"]), fmt_accuracy(s["all_topics_avg_acc"], s["all_topics_avg_acc_stderr"])])
    return markdown_table(header, rows)


def comparison_table(result: dict) -> str:
    """FANG against its baseline, paired by calibration source and evaluation data (`compare_sources`)."""
    header = ["method", "baseline", "sparsity", "sources", "OOD PPL vs baseline", "ID PPL vs baseline",
              "OOD/ID gap vs baseline", "all-topics PPL vs baseline", "Avg acc difference (points)"]
    rows = []
    for c in result["comparisons"]:
        head = [c["method"], c["baseline"], f"{c['sparsity']:.0%}", ", ".join(c["sources"])]
        if "error" in c:
            rows.append([*head, c["error"], "", "", "", ""])
            continue
        rows.append([*head, *[fmt_comparison(c.get(k), unit="%") for k in
                              ("ood_ppl_vs_baseline", "id_ppl_vs_baseline", "ood_id_gap_vs_baseline",
                               "all_topics_ppl_vs_baseline")],
                     fmt_comparison(c.get("avg_acc_diff"))])
    return markdown_table(header, rows)


def runs_table(result: dict) -> str:
    header = ["method", "source", "sparsity", "achieved", "PPL", "ID", "OOD", "OOD/ID", "Avg acc"]
    rows = []
    for r in result["records"]:
        if r["status"] == "missing":
            rows.append([r["method"], r["source"], f"{r['sparsity']:.0%}", "missing: run failed or not run",
                         *[""] * (len(header) - 4)])
            continue
        rows.append([r["method"], r["source"], f"{r['sparsity']:.0%}", fmt_accuracy(r["achieved_sparsity"]), f"{r['ppl']:.2f}",
                     _pct(r["id_increase"]), _pct(r["ood_increase"]), _ratio(r["ood_id_ratio"]),
                     fmt_accuracy(r["avg_acc"], r["avg_acc_stderr"])])
    return markdown_table(header, rows)


def topics_table(result: dict) -> str:
    """Rows method x source x sparsity, columns evaluation topic: % PPL increase; the calibration topic in bold."""
    topics = result["topics"]
    header = ["method", "source", "sparsity", *topics]
    rows = []
    for r in result["records"]:
        if r["status"] == "missing":
            rows.append([r["method"], r["source"], f"{r['sparsity']:.0%}", *["missing"] * len(topics)])
            continue
        cells = []
        for t in topics:
            text = _pct(r["increase_by_topic"][t])
            cells.append(f"**{text}**" if t == r["source"] else text)
        rows.append([r["method"], r["source"], f"{r['sparsity']:.0%}", *cells])
    return markdown_table(header, rows)


SUMMARY_TITLE = "Per method: single-topic calibration against all-topic calibration"
SUMMARY_NOTE = ("Mean over the single-topic sources, ± standard deviation across them; accuracy ± the mean of the "
                "per-source standard errors (the sources share the questions, so their errors do not average out).")
COMPARISON_TITLE = "Each method against its baseline, paired by calibration source"
COMPARISON_NOTE = ("A method (FANG variants, ica_fn, gprune) against its baseline calibrated on the same source, on the same test windows and questions: "
                   "PPL_method / PPL_baseline - 1 (geometric mean over the single-topic sources) on the OOD topics, on "
                   "the calibration topic (ID), and their quotient (OOD/ID gap: negative = the method loses less off-topic "
                   "relative to on-topic); accuracy = mean over sources of the average-accuracy difference, in points. "
                   "95% paired-bootstrap intervals over test windows and questions (conditional on these calibration "
                   "sets); the word is read from the interval.")


def render(result: dict, dense: dict) -> tuple[str, str]:
    """(Markdown, CSV) of the study."""
    topics = result["topics"]
    md = ["## Calibration bias: perplexity increase over dense by evaluation topic", "", *_intro(result, dense),
          f"### {SUMMARY_TITLE}", "", SUMMARY_NOTE, "", summary_table(result), "",
          f"### {COMPARISON_TITLE}", "", COMPARISON_NOTE, "", comparison_table(result), "",
          *bias_verdict_lines(result["comparisons"]), "", "### Every run", "", runs_table(result), "",
          "### Perplexity increase by evaluation topic", "", "The calibration topic's own cell is in bold.", "",
          topics_table(result), ""]
    md += removal.removal_markdown(result.get("attribution"))  # set by stages/bias_report.py when models were attributed
    buf = io.StringIO()
    fields = ["method", "source", "sparsity", "status", "achieved_sparsity", "ppl", "id_increase", "ood_increase",
              "ood_id_ratio", "avg_acc", "avg_acc_stderr", *[f"increase_{t}" for t in topics]]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in result["records"]:
        writer.writerow({**r, **{f"increase_{t}": v for t, v in r.get("increase_by_topic", {}).items()}})
    return "\n".join(md), buf.getvalue()


README_START = "<!-- bias:start -->"  # the block of docs/results.md
README_END = "<!-- bias:end -->"


def _bias_cell_words(c: dict) -> str:
    words = [f"{label} {verdict_word(c.get(key), 100, '%')}" for label, key in
             (("OOD PPL", "ood_ppl_vs_baseline"), ("OOD/ID gap", "ood_id_gap_vs_baseline"),
              ("all-topics PPL", "all_topics_ppl_vs_baseline")) if c.get(key)]
    if c.get("avg_acc_diff"):
        words.append(f"accuracy {verdict_word(c['avg_acc_diff'], 100, ' points')}")
    return ", ".join(words)


def bias_verdict_lines(comparisons: list[dict]) -> list[str]:
    """One line per (method, baseline) pair: at each sparsity, the words for off-topic (OOD) perplexity,
    the OOD/ID gap and the all-topics calibration, read from the paired intervals."""
    return pair_verdict_lines(comparisons, _bias_cell_words)


def readme_fragment(result: dict, dense: dict, when: str, image: str | None) -> str:
    """The docs/results.md block: intro, per-method summary and every run (the per-topic table stays in bias.md)."""
    lines = [f"<!-- generated by `fang bias-report --results` on {when}; rerun it instead of editing -->", "",
             *_intro(result, dense), f"**{SUMMARY_TITLE}.** {SUMMARY_NOTE}", "", summary_table(result), "",
             f"**{COMPARISON_TITLE}.** {COMPARISON_NOTE}", "", comparison_table(result), "",
             "In words (negative = the method's perplexity is lower than its baseline's):", "",
             *bias_verdict_lines(result["comparisons"]), "", "**Every run**", "", runs_table(result)]
    lines += ["", *removal.removal_markdown(result.get("attribution"), per_cell=False)]
    if image:
        lines += ["", f"![perplexity increase over dense by evaluation topic]({image})"]
    lines += ["", "Per-topic numbers: `artifacts/bias_report/bias.md` and `bias.csv`."]
    return "\n".join(lines)


def heatmap(result: dict, path: Path) -> None:
    """PNG: one panel per sparsity; rows method x source, columns evaluation topic, colour = % PPL increase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    topics = result["topics"]
    sparsities = sorted({r["sparsity"] for r in result["records"]})
    n_rows = max(1, len([r for r in result["records"] if r["sparsity"] == sparsities[0]])) if sparsities else 1
    fig, axes = plt.subplots(1, max(1, len(sparsities)), figsize=(1.0 + 0.75 * len(topics) * max(1, len(sparsities)),
                                                                   1.5 + 0.38 * n_rows), squeeze=False)
    ok = [v * 100 for r in result["records"] if r["status"] == "ok" for v in r["increase_by_topic"].values() if v is not None]
    vmax = max(ok) if ok else 1.0
    # colour by log(PPL / PPL_dense): perplexity ratios span 1.5x to 20x, and a linear scale would
    # leave every OBC row pale next to FLAP's
    cmax = math.log1p(max(vmax, 1.0) / 100)
    ticks = [p for p in (0, 25, 50, 100, 200, 500, 1000, 2000, 5000, 10000) if p <= max(vmax, 1.0)]
    for ax, sp in zip(axes[0], sparsities):
        recs = [r for r in result["records"] if r["sparsity"] == sp]
        grid = np.full((len(recs), len(topics)), np.nan)
        for i, r in enumerate(recs):
            if r["status"] == "ok":
                grid[i] = [np.nan if r["increase_by_topic"][t] is None else r["increase_by_topic"][t] * 100 for t in topics]
        cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="#d0d0d0")
        colour = np.log1p(np.clip(grid, -99.0, None) / 100)
        im = ax.imshow(colour, aspect="auto", cmap=cmap, vmin=0.0, vmax=cmax)
        for i, r in enumerate(recs):
            for j, t in enumerate(topics):
                if r["status"] != "ok":
                    ax.text(j, i, "missing", ha="center", va="center", fontsize=6, color="black")
                    continue
                v = grid[i, j]
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if colour[i, j] > 0.6 * cmax else "black", fontweight="bold" if t == r["source"] else "normal")
                if t == r["source"]:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#00a0ff", linewidth=1.5))
        ax.set_xticks(range(len(topics)), [t[:14] for t in topics], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(recs)), [f"{r['method']} / {r['source']}" for r in recs], fontsize=7)
        ax.set_title(f"sparsity {sp:.0%}: PPL increase over dense (%, log colour scale)", fontsize=9)
        bar = fig.colorbar(im, ax=ax, fraction=0.03)
        bar.set_ticks([math.log1p(p / 100) for p in ticks], labels=[f"+{p}%" for p in ticks])
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
