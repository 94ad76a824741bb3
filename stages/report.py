"""report: one table of every method x sparsity of the sweep (plus dense), as Markdown, CSV and a PNG."""

import time

from fang.core import paths
from fang.core.atomic import atomic_file, write_json
from fang.core.markdown import publish, replace_between_markers
from fang.core.params import ScreenParams, SweepParams, load_block
from fang.core.progress import console
from fang.data.corpus import read_jsonl
from fang.data.paper_tasks import scorable_rows
from fang.evaluation.removal import plot_removal_correlation, read_cell_removal, removal_correlations, removal_markdown
from fang.evaluation.task_screen import judge_tasks
from fang.evaluation.report import (
    HEADLINE_END,
    HEADLINE_START,
    README_END,
    README_START,
    Run,
    kept_tasks,
    load_json,
    paired_comparisons,
    plot,
    headline_fragment,
    readme_fragment,
    render,
)

RESULTS_IMAGE = "sparsity_curves.png"  # committed copy of the plot, beside the results page (docs/)


def informative(dense: dict | None, min_z: float) -> dict | None:
    """The screen's decision per task, made again on the dense row (every question): averages count only
    the tasks it keeps. None (every task averaged) without a dense row or the task folder."""
    if dense is None or not paths.TASKS.is_dir():
        return None
    rows_of = {f.stem: scorable_rows(f.stem, read_jsonl(f)) for f in paths.TASKS.glob("*.jsonl")}
    return judge_tasks(dense["tasks"], rows_of, min_z)


def attribution_section(runs: list[Run], params_path: str):
    """Per method (its sparsities pooled) the correlation across topics between the share of a topic's
    selective neurons removed and its perplexity increase, from the cells `fang attribute-removed` scored."""
    dense = runs[0].metrics
    if dense is None:
        return None, []
    cells = []
    for r in runs[1:]:
        if r.metrics is None:
            continue
        increase = {t: r.metrics["ppl_by_topic"][t] / v - 1 for t, v in dense["ppl_by_topic"].items()
                    if t in r.metrics.get("ppl_by_topic", {})}
        cell = read_cell_removal(paths.SWEEP / f"{r.method}-{r.sparsity}.attribution.json", r.method, "all",
                                 r.sparsity, increase)
        cells += [cell] if cell else []
    if not cells:
        return None, []
    a = load_block("attribute", path=params_path)
    return removal_correlations(cells, sorted(dense["ppl_by_topic"]), a.n_boot, a.seed), cells


def run(params_path: str = "params.yaml", results: str | None = None, readme: str | None = None) -> None:
    """`results`: a page (docs/results.md) whose report block gets the full table, the paired verdicts and the
    plot; `readme`: a page (README.md) whose headline block gets the per-method headline table."""
    p = load_block("sweep", SweepParams, path=params_path)
    # dense evaluated on the sweep's examples (stage sweep_dense), not the main job's quick subset
    runs = [Run("dense", 0.0, load_json(paths.SWEEP / "dense.metrics.json"))]
    for method in p.methods:
        for sparsity in p.sparsities:
            # not Path.with_suffix: "flap-0.3" would lose its ".3"
            name = f"{method}-{sparsity}"
            runs.append(Run(method, sparsity, load_json(paths.SWEEP / f"{name}.metrics.json"),
                            load_json(paths.SWEEP / f"{name}.prune.json")))
    judged = informative(runs[0].metrics, load_block("screen", ScreenParams, path=params_path).min_z)
    averaged = kept_tasks(judged)
    comparisons = paired_comparisons(runs, list(p.methods), list(p.sparsities), averaged)
    write_json(paths.REPORT / "paired.json", {"pairs": comparisons, "averaged_tasks": averaged,
                                              "tasks": {t: c.as_dict() for t, c in (judged or {}).items()}})
    md, table_csv = render(runs, comparisons, judged)
    section, cells = attribution_section(runs, params_path)
    if section:
        md += "\n" + "\n".join(removal_markdown(section))
        write_json(paths.REPORT / "attribution.json", section)
        plot_removal_correlation(section, cells, paths.REPORT / "attribution_correlation.png")
    with atomic_file(paths.REPORT / "results.md") as fh:
        fh.write(md)
    with atomic_file(paths.REPORT / "results.csv") as fh:
        fh.write(table_csv)
    plot(runs, paths.REPORT / "sparsity_curves.png", averaged)
    when = time.strftime("%Y-%m-%dT%H:%M:%S")
    if results:
        publish(results, paths.REPORT / "sparsity_curves.png", RESULTS_IMAGE,
                lambda image: readme_fragment(runs, when, image, comparisons, judged)
                + ("\n\n" + "\n".join(removal_markdown(section)).rstrip() if section else ""), README_START, README_END)
    if readme:
        replace_between_markers(readme, headline_fragment(runs, when, judged), HEADLINE_START, HEADLINE_END)
    missing = [r.label for r in runs if r.metrics is None]
    console.print(f"report -> {paths.REPORT}/results.md" + (f" (missing: {', '.join(missing)})" if missing else ""))
