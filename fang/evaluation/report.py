"""Results tables in the layout of the paper's Tables 1 and 10: one row per method x sparsity.

Columns: perplexity, accuracy per task (± standard error), the average over tasks, and per-topic
perplexity in a second table. Written as Markdown and CSV, plus a PNG of average accuracy and
perplexity against sparsity per method. A run that is missing is listed as missing, not dropped.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.errors import FangError
from ..core.markdown import markdown_table
from ..data.paper_tasks import PAPER_TASKS
from .paired import NO_DIFFERENCE

PAPER_AVG = "Avg7"  # the seed paper's headline: mean over its seven commonsense tasks


@dataclass
class Run:
    method: str
    sparsity: float
    metrics: dict | None  # evaluate's JSON, None when the run is missing
    prune: dict | None = None  # prune report (achieved sparsity), when there is one

    @property
    def label(self) -> str:
        return "dense" if self.method == "dense" else f"{self.method} {self.sparsity:.0%}"


def headline_tasks(metrics: dict) -> list[str]:
    """Tasks reported as columns: every task except the subtasks of a group (per-topic next-sentence,
    MMLU's subjects): the group stands for them."""
    return [t for t in metrics["tasks"] if not t.startswith(("next_sentence_", "mmlu_"))]


def paper_tasks_in(tasks: list[str]) -> list[str]:
    """The seed paper's seven tasks, when all of them are among `tasks` (else none: no partial Avg7)."""
    return list(PAPER_TASKS) if all(t in tasks for t in PAPER_TASKS) else []


# The seed paper's Table 1 (LLaMA-2-7B, its dense average 66.69 over the seven tasks), as a reference for
# retention = method average / dense average; typed from the paper (seed 001), not measured here.
PAPER_TABLE1 = {"dense": 66.69, ("O-FANG", 0.3): 59.83, ("O-FANG", 0.4): 54.96, ("OBC", 0.3): 57.88,
                ("OBC", 0.4): 52.47, ("FLAP", 0.3): 50.91, ("FLAP", 0.4): 48.70, ("SoBP", 0.3): 59.15,
                ("SoBP", 0.4): 56.06}


def paper_reference_table() -> str:
    """The paper's LLaMA-2-7B rows with their retention, to set beside ours."""
    dense = PAPER_TABLE1["dense"]
    methods = list(dict.fromkeys(m for m, _ in (k for k in PAPER_TABLE1 if k != "dense")))
    rows = [["dense (LLaMA-2-7B)", f"{dense:.2f}", "100.0%", "", ""]]
    for m in methods:
        a, b = PAPER_TABLE1[(m, 0.3)], PAPER_TABLE1[(m, 0.4)]
        rows.append([m, f"{a:.2f}", f"{a / dense:.1%}", f"{b:.2f}", f"{b / dense:.1%}"])
    return markdown_table(["the paper's Table 1", "Avg7 30%", "retention 30%", "Avg7 40%", "retention 40%"], rows)


def reported_metric(entry: dict) -> str:
    """The metric a task's row reports, as the pruning literature does with lm-eval: acc_norm where
    lm-eval gives it, else acc. The one place that rule lives (tables, paired comparisons, plan-sizes)."""
    return "acc_norm" if entry.get("acc_norm") is not None else "acc"


def task_accuracy(entry: dict) -> tuple[float | None, float | None]:
    """The task's accuracy and standard error in its reported metric (`reported_metric`)."""
    key = reported_metric(entry)
    return (entry[key], entry.get(f"{key}_stderr")) if entry.get(key) is not None else (None, None)


def average(values: list[tuple[float | None, float | None]]) -> tuple[float | None, float | None]:
    """Mean accuracy over tasks and its standard error (independent tasks: sqrt(sum se^2) / n)."""
    if not values or any(v is None for v, _ in values):
        return None, None
    mean = sum(v for v, _ in values) / len(values)
    ses = [s for _, s in values]
    se = math.sqrt(sum(s * s for s in ses)) / len(values) if all(s is not None for s in ses) else None
    return mean, se


def fmt_accuracy(value: float | None, se: float | None = None, scale: float = 100.0, digits: int = 1) -> str:
    if value is None:
        return "—"
    text = f"{value * scale:.{digits}f}"
    return f"{text} ± {se * scale:.{digits}f}" if se is not None else text


def table_rows(runs: list[Run], averaged: list[str] | None = None) -> tuple[list[str], list[list[str]], list[dict]]:
    """Header, formatted rows, and raw records (for CSV) of the main table. Avg is over `averaged`
    (None: every task); a task left out of it is marked † in the header."""
    tasks: list[str] = []
    for run in runs:
        if run.metrics:
            tasks += [t for t in headline_tasks(run.metrics) if t not in tasks]
    in_avg = [t for t in tasks if averaged is None or t in averaged]
    seven = paper_tasks_in(tasks)
    header = ["method", "sparsity", "achieved", "PPL", *[t if t in in_avg else f"{t} †" for t in tasks]]
    header += [PAPER_AVG, "retention"] if seven else []
    header += ["Avg"]
    dense_avg7 = None
    rows, records = [], []
    for run in runs:
        if run.metrics is None:
            rows.append([run.method, f"{run.sparsity:.0%}", "missing: run failed or not run", *[""] * (len(header) - 3)])
            records.append({"method": run.method, "sparsity": run.sparsity, "status": "missing"})
            continue
        accs = [task_accuracy(run.metrics["tasks"][t]) if t in run.metrics["tasks"] else (None, None) for t in tasks]
        avg = average([a for t, a in zip(tasks, accs) if t in in_avg])
        achieved = run.prune["achieved_sparsity"] if run.prune else (0.0 if run.method == "dense" else None)
        row = [run.method, f"{run.sparsity:.0%}", fmt_accuracy(achieved, digits=1), f"{run.metrics['ppl']:.2f}",
               *[fmt_accuracy(v, s) for v, s in accs]]
        rec = {"method": run.method, "sparsity": run.sparsity, "status": "ok", "achieved_sparsity": achieved,
               "ppl": run.metrics["ppl"], "avg": avg[0], "avg_stderr": avg[1]}
        if seven:
            avg7 = average([a for t, a in zip(tasks, accs) if t in seven])
            if run.method == "dense":
                dense_avg7 = avg7[0]
            retention = avg7[0] / dense_avg7 if avg7[0] is not None and dense_avg7 else None
            row += [fmt_accuracy(*avg7), f"{retention:.1%}" if retention is not None else "—"]
            rec.update(avg7=avg7[0], avg7_stderr=avg7[1], retention=retention)
        rows.append(row + [fmt_accuracy(*avg)])
        for t, (v, s) in zip(tasks, accs):
            rec[t], rec[f"{t}_stderr"] = v, s
        rec.update({f"ppl_{topic}": v for topic, v in run.metrics.get("ppl_by_topic", {}).items()})
        records.append(rec)
    return header, rows, records


def topic_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    topics = sorted({t for r in runs if r.metrics for t in r.metrics.get("ppl_by_topic", {})})
    header = ["method", "sparsity", *topics]
    rows = []
    for r in runs:
        by = (r.metrics or {}).get("ppl_by_topic", {})
        rows.append([r.method, f"{r.sparsity:.0%}", *[f"{by[t]:.2f}" if t in by else "—" for t in topics]])
    return header, rows


AVG7_NOTE = (f"{PAPER_AVG} = mean over the seed paper's seven tasks (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, "
             "ARC-c, OpenBookQA), the headline every pruning paper reports; retention = its ratio to the dense row's. ")


def averaged_note(judged: dict | None) -> str:
    """Which tasks the informative average leaves out and why (the screen's rule on the dense row)."""
    if not judged:
        return "Avg = mean over the task columns (its standard error assumes independent tasks)."
    out = [f"{t} ({c.decision.removeprefix('dropped: ')})" for t, c in judged.items() if c.decision != "kept"]
    return ("Avg = mean over the tasks on which the dense row carries signal, by the screen's rule (docs/evaluation.md, "
            "\"Evaluation tasks\"); standard errors assume independent tasks. "
            + (f"Shown but left out of Avg (†): {'; '.join(out)}." if out else "No task is left out."))


def render(runs: list[Run], comparisons: list[dict] | None = None, judged: dict | None = None) -> tuple[str, str]:
    """(Markdown, CSV) of the whole report; `judged` = task_screen.judge_tasks on the dense row."""
    header, rows, records = table_rows(runs, kept_tasks(judged))
    t_header, t_rows = topic_table(runs)
    md = ["## Perplexity and zero-shot accuracy",
          "",
          "Accuracy in %, ± standard error from lm-eval: acc_norm where the task reports it, else acc. "
          + AVG7_NOTE + averaged_note(judged) + " achieved = measured fraction of decoder-block parameters removed.",
          "",
          markdown_table(header, rows), ""]
    if PAPER_AVG in header:
        md += ["For reference, the seed paper's LLaMA-2-7B rows (its Table 1, typed from the paper):", "",
               paper_reference_table(), ""]
    if comparisons:
        p_header, p_rows = paired_table(comparisons)
        md += ["## FANG against its baselines, paired", "", PAIRED_NOTE, "", markdown_table(p_header, p_rows), "",
               "In words (method vs its baseline; the in-domain word only where it differs from no detectable "
               "difference):", "", *verdict_lines(comparisons), "", "Per task and per topic: `paired.json`.", ""]
    md += ["## Perplexity by topic (test split)", "", markdown_table(t_header, t_rows), ""]
    buf = io.StringIO()
    keys: list[str] = []
    for rec in records:
        keys += [k for k in rec if k not in keys]
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(records)
    return "\n".join(md), buf.getvalue()


# ------------------------------------------------------------------------------ paired comparisons

# tasks built from the calibration corpus itself (in-domain); every other task is out of domain
IN_DOMAIN_PREFIXES = ("next_sentence",)


def is_in_domain(task: str) -> bool:
    return task.startswith(IN_DOMAIN_PREFIXES)


def base_method(name: str) -> str:
    return name.split("+")[0]


# Besides its own baseline, every FANG row is paired with SoBP's: the seed paper's strongest Table 1
# baseline (LLaMA-2-7B at 40%: 56.06 against O-FANG's 54.96), the one a FANG recipe must also beat (issue 28).
RIVALS = {"o_fang": ("sobp",), "f_fang": ("sobp",)}


def comparison_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """(method variant, baseline) pairs among the sweep's rows: every row of a method whose registry line
    names a baseline against every row of that baseline (f_fang* against flap*, o_fang* against obc*,
    obc_iter excluded: another algorithm), then every FANG row against every SoBP row (`RIVALS`)."""
    from ..core.registry import REGISTRY

    pairs = []
    for m in methods:
        spec = REGISTRY.get(base_method(m))
        against = ((spec.baseline,) if spec is not None and spec.baseline else ()) + RIVALS.get(base_method(m), ())
        pairs += [(m, b) for rival in against for b in methods if base_method(b) == rival]
    return pairs


def paired_examples(metrics: dict) -> tuple[dict[str, dict], dict[str, str]]:
    """Per headline task its per-question scores (a group pools its subtasks) and the metric shown."""
    tasks = metrics["tasks"]
    examples, metric_of = {}, {}
    for task in headline_tasks(metrics):
        entry = tasks[task]
        metric = reported_metric(entry)
        if "per_example" in entry:
            examples[task] = entry["per_example"]
        else:  # a group: pool its subtasks, doc ids made unique per subtask
            subs = sorted(t for t in tasks if t.startswith(f"{task}_") and "per_example" in tasks[t])
            if not subs:
                continue
            pooled: dict[str, list] = {"doc_id": [], metric: []}
            for i, sub in enumerate(subs):
                pe = tasks[sub]["per_example"]
                pooled["doc_id"] += [i * 1_000_000 + d for d in pe["doc_id"]]
                pooled[metric] += pe[metric]
            examples[task] = pooled
        metric_of[task] = metric
    return examples, metric_of


def kept_tasks(judged: dict | None) -> list[str] | None:
    return None if judged is None else [t for t, c in judged.items() if c.decision == "kept"]


def compare_runs(a: Run, b: Run, averaged: list[str] | None = None) -> dict:
    """B against A, paired: perplexity (overall and per topic), accuracy per task, averages over all,
    in-domain and out-of-domain tasks (of `averaged`, None: every task). Values are Comparison.as_dict()."""
    from .paired import accuracy_difference, perplexity_differences

    out: dict = {"a": a.label, "b": b.label}
    out["perplexity"] = {k: c.as_dict() for k, c in
                         perplexity_differences(a.metrics.get("ppl_windows"), b.metrics.get("ppl_windows")).items()}
    ex_a, metric_of = paired_examples(a.metrics)
    ex_b, _ = paired_examples(b.metrics)
    common = [t for t in ex_a if t in ex_b]
    seven = paper_tasks_in(common)
    out["accuracy"] = {}
    if seven:  # the paper's headline average, whatever the screen says of each task on the dense model
        res = accuracy_difference({t: ex_a[t] for t in seven}, {t: ex_b[t] for t in seven}, metric_of)
        out["accuracy"][f"average_{PAPER_AVG.lower()}"] = res["average"].as_dict()
    if averaged is not None:  # per task for every common task, averages over the informative ones
        per_task = accuracy_difference({t: ex_a[t] for t in common}, {t: ex_b[t] for t in common}, metric_of)
        out["accuracy"].update({t: per_task[t].as_dict() for t in common})
        common = [t for t in common if t in averaged]
    groups = {"all": common, "in_domain": [t for t in common if is_in_domain(t)],
              "out_of_domain": [t for t in common if not is_in_domain(t)]}
    for group, tasks in groups.items():
        if not tasks:
            continue
        res = accuracy_difference({t: ex_a[t] for t in tasks}, {t: ex_b[t] for t in tasks}, metric_of)
        if group == "all" and averaged is None:
            out["accuracy"].update({t: res[t].as_dict() for t in tasks})
        out["accuracy"][f"average_{group}"] = res["average"].as_dict()
    return out


def fmt_interval(c: dict, scale: float = 100.0, unit: str = "") -> str:
    """A paired estimate with its 95% interval: "+1.2 [+0.1, +2.3]", or "+3.1% [+2.0, +4.2]" with unit "%"."""
    return f"{c['estimate'] * scale:+.1f}{unit} [{c['low'] * scale:+.1f}, {c['high'] * scale:+.1f}]"


def fmt_comparison(c: dict | None, scale: float = 100.0, unit: str = "") -> str:
    if c is None:
        return "—"
    return f"{fmt_interval(c, scale, unit)} **{c['verdict']}**"


def paired_table(comparisons: list[dict]) -> tuple[list[str], list[list[str]]]:
    seven = any(f"average_{PAPER_AVG.lower()}" in c.get("accuracy", {}) for c in comparisons)
    header = ["method", "baseline", "sparsity", "PPL change", *([f"{PAPER_AVG} (points)"] if seven else []),
              "Avg acc (points)", "out-of-domain avg", "in-domain avg"]
    rows = []
    for c in comparisons:
        acc = c.get("accuracy", {})
        rows.append([c["method"], c["baseline"], f"{c['sparsity']:.0%}",
                     fmt_comparison(c.get("perplexity", {}).get("overall"), unit="%"),
                     *([fmt_comparison(acc.get(f"average_{PAPER_AVG.lower()}"))] if seven else []),
                     fmt_comparison(acc.get("average_all")), fmt_comparison(acc.get("average_out_of_domain")),
                     fmt_comparison(acc.get("average_in_domain"))])
    return header, rows


def verdict_word(c: dict | None, scale: float, unit: str) -> str:
    """The interval's word (better / worse / no detectable difference) and its estimate, for prose."""
    if c is None:
        return "—"
    word = NO_DIFFERENCE if c["verdict"] == NO_DIFFERENCE else f"**{c['verdict']}**"
    return f"{word} ({c['estimate'] * scale:+.1f}{unit})"


def pair_verdict_lines(comparisons: list[dict], describe: Callable[[dict], str]) -> list[str]:
    """One line per (method, baseline) pair, its sparsities in order, each cell worded by `describe`;
    comparisons that errored are left out."""
    ok = [c for c in comparisons if "error" not in c]
    lines = []
    for pair in dict.fromkeys((c["method"], c["baseline"]) for c in ok):
        cells = sorted((c for c in ok if (c["method"], c["baseline"]) == pair), key=lambda c: c["sparsity"])
        lines.append(f"- **{pair[0]} vs {pair[1]}**: " + "; ".join(f"{c['sparsity']:.0%}: {describe(c)}" for c in cells) + ".")
    return lines


def _sweep_cell_words(c: dict) -> str:
    acc = c.get("accuracy", {})
    words = f"PPL {verdict_word(c.get('perplexity', {}).get('overall'), 100, '%')}, "
    seven = acc.get(f"average_{PAPER_AVG.lower()}")
    if seven is not None:
        words += f"{PAPER_AVG} {verdict_word(seven, 100, ' points')}, informative "
    words += f"accuracy {verdict_word(acc.get('average_all'), 100, ' points')}"
    if acc.get("average_in_domain", {}).get("verdict", NO_DIFFERENCE) != NO_DIFFERENCE:
        words += f", in-domain {verdict_word(acc['average_in_domain'], 100, ' points')}"
    return words


def verdict_lines(comparisons: list[dict]) -> list[str]:
    """One line per (method, baseline) pair: the perplexity and average-accuracy word at each sparsity,
    read from the paired intervals (the outcome a README states, generated rather than typed)."""
    return pair_verdict_lines(comparisons, _sweep_cell_words)


def paired_comparisons(runs: list[Run], methods: list[str], sparsities: list[float],
                       averaged: list[str] | None = None) -> list[dict]:
    """Every (method, its registry baseline) pair at every sparsity where both runs exist, compared paired:
    the FANG variants against FLAP/OBC, ica_fn against FLAP, gprune against Wanda-sp."""
    by_key = {(r.method, r.sparsity): r for r in runs if r.metrics}
    out = []
    for method_m, base_m in comparison_pairs(methods):
        for sp in sparsities:
            a, b = by_key.get((base_m, sp)), by_key.get((method_m, sp))
            if a is None or b is None:
                continue
            try:
                res = compare_runs(a, b, averaged)
            except FangError as exc:  # an old metrics file without per-question scores
                res = {"error": str(exc)}
            out.append({"method": method_m, "baseline": base_m, "sparsity": sp, **res})
    return out


PAIRED_NOTE = (
    "Each method minus its baseline on the same questions and perplexity windows, 95% paired-bootstrap interval "
    "in brackets; the word is read from the interval (better / worse / no detectable difference). "
    "PPL change = PPL_method / PPL_baseline - 1 (negative is better); accuracy in points. "
    f"{PAPER_AVG} = the seven paper tasks; the other averages are over the tasks in the table's Avg. In-domain = tasks built from the calibration corpus "
    "(next-sentence); out-of-domain = the rest. The perplexity interval covers the text windows only: rebuilding "
    "one recipe on another machine moved its perplexity by more than that interval (docs/pipeline.md, \"Rebuilding "
    "on another machine\"), so a perplexity verdict of a few percent is weaker than its interval says."
)


README_START = "<!-- report:start -->"  # the block of docs/results.md (`fang report --results`)
README_END = "<!-- report:end -->"
HEADLINE_START = "<!-- headline:start -->"  # the README's headline table (`fang report --readme`)
HEADLINE_END = "<!-- headline:end -->"


def readme_fragment(runs: list[Run], when: str, image: str | None, comparisons: list[dict] | None = None,
                    judged: dict | None = None) -> str:
    """The docs/results.md block: the method x sparsity table and the paired verdicts (per-topic perplexity
    stays in artifacts/report/results.md)."""
    header, rows, _ = table_rows(runs, kept_tasks(judged))
    lines = [f"<!-- generated by `fang report --results` on {when}; rerun it instead of editing -->", "",
             "Accuracy in %, ± standard error from lm-eval (acc_norm where the task has it, else acc). "
             + AVG7_NOTE + averaged_note(judged) + " achieved = measured fraction of decoder-block parameters removed.",
             "", markdown_table(header, rows)]
    if PAPER_AVG in header:
        lines += ["", "For reference, the seed paper's LLaMA-2-7B rows (its Table 1, typed from the paper):", "",
                  paper_reference_table()]
    if comparisons:
        p_header, p_rows = paired_table(comparisons)
        lines += ["", PAIRED_NOTE, "", markdown_table(p_header, p_rows), "",
                  "In words (method vs its baseline; the in-domain word only where it differs from no detectable "
                  "difference):", "", *verdict_lines(comparisons)]
    if image:
        lines += ["", f"![average accuracy and perplexity against sparsity]({image})"]
    lines += ["", "Per-topic perplexity: `artifacts/report/results.md` and `results.csv`."]
    return "\n".join(lines)


def headline_fragment(runs: list[Run], when: str, judged: dict | None = None,
                      full: str = "docs/results.md#method--sparsity-default-model-and-tasks") -> str:
    """The README's headline: per method, perplexity and average accuracy at each sparsity (the same
    numbers as the full table, whose standard errors, tasks and paired verdicts stay at `full`)."""
    _, _, records = table_rows(runs, kept_tasks(judged))
    sparsities = sorted({r["sparsity"] for r in records if r["method"] != "dense"})
    by = {(r["method"], r["sparsity"]): r for r in records}
    dense = by.get(("dense", 0.0))

    seven = dense is not None and dense.get("avg7") is not None  # the paper's headline, when all seven ran

    def cell(rec: dict | None) -> str:
        if rec is None or rec["status"] != "ok":
            return "missing"
        if seven:
            kept = f" ({rec['retention']:.1%})" if rec.get("retention") is not None else ""
            return f"{rec['ppl']:.2f} / {fmt_accuracy(rec.get('avg7'))}{kept}"
        return f"{rec['ppl']:.2f} / {fmt_accuracy(rec['avg'])}"

    methods = list(dict.fromkeys(r["method"] for r in records if r["method"] != "dense"))
    rows = [[m, *[cell(by.get((m, s))) for s in sparsities]] for m in methods]
    if seven:
        what = (f"Dense model: perplexity {dense['ppl']:.2f}, {PAPER_AVG} {fmt_accuracy(dense['avg7'])}%. Each cell: "
                f"perplexity on the test split / {PAPER_AVG}, the average zero-shot accuracy (%) over the seed paper's "
                "seven tasks (retention = its share of the dense model's). ")
    else:
        what = ((f"Dense model: perplexity {dense['ppl']:.2f}, average accuracy {fmt_accuracy(dense['avg'])}%. "
                 if dense and dense["status"] == "ok" else "Dense model: missing. ") + "Each cell: "
                "perplexity on the test split / average zero-shot accuracy (%) over the dev tasks that carry signal. ")
    lines = [f"<!-- generated by `fang report --readme` on {when}; rerun it instead of editing -->", "",
             what + f"Standard errors, every task and the paired verdicts: [docs/results.md]({full}).", "",
             markdown_table(["method", *[f"{s:.0%} sparsity" for s in sparsities]], rows)]
    return "\n".join(lines)


def plot(runs: list[Run], path: Path, averaged: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, _, records = table_rows(runs, averaged)
    ok = [r for r in records if r["status"] == "ok"]
    dense = next((r for r in ok if r["method"] == "dense"), None)
    fig, (ax_acc, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in ok if r["method"] != "dense"):
        pts = sorted(((r["sparsity"], r["avg"], r["avg_stderr"] or 0.0, r["ppl"]) for r in ok if r["method"] == method),
                     key=lambda p: p[0])
        if dense:
            pts = [(0.0, dense["avg"], dense["avg_stderr"] or 0.0, dense["ppl"])] + pts
        acc = [p for p in pts if p[1] is not None]  # no average when no task carries signal on dense
        if acc:
            ax_acc.errorbar([p[0] * 100 for p in acc], [p[1] * 100 for p in acc], yerr=[p[2] * 100 for p in acc],
                            marker="o", capsize=3, label=method)
        ax_ppl.plot([p[0] * 100 for p in pts], [p[3] for p in pts], marker="o", label=method)
    ax_acc.set(xlabel="sparsity (%)", ylabel="average accuracy (%)", title="Average zero-shot accuracy")
    ax_ppl.set(xlabel="sparsity (%)", ylabel="perplexity", title="Test perplexity", yscale="log")
    for ax in (ax_acc, ax_ppl):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None
