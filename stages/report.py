"""report: one table of every method x sparsity of the sweep (plus dense), as Markdown, CSV and a PNG."""

import time

from fang.core import paths
from fang.core.atomic import atomic_file, write_json
from fang.core.markdown import publish
from fang.core.params import ScreenParams, SweepParams, load_block
from fang.core.progress import console
from fang.data.corpus import read_jsonl
from fang.evaluation.task_screen import judge_tasks
from fang.evaluation.report import (
    README_END,
    README_START,
    Run,
    kept_tasks,
    load_json,
    paired_comparisons,
    plot,
    readme_fragment,
    render,
)

README_IMAGE = "docs/sparsity_curves.png"  # committed copy of the plot the README shows


def informative(dense: dict | None, min_z: float) -> dict | None:
    """The screen's decision per task, made again on the dense row (every question): averages count only
    the tasks it keeps. None (every task averaged) without a dense row or the task folder."""
    if dense is None or not paths.TASKS.is_dir():
        return None
    rows_of = {f.stem: read_jsonl(f) for f in paths.TASKS.glob("*.jsonl")}
    return judge_tasks(dense["tasks"], rows_of, min_z)


def run(params_path: str = "params.yaml", readme: str | None = None) -> None:
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
    with atomic_file(paths.REPORT / "results.md") as fh:
        fh.write(md)
    with atomic_file(paths.REPORT / "results.csv") as fh:
        fh.write(table_csv)
    plot(runs, paths.REPORT / "sparsity_curves.png", averaged)
    if readme:
        when = time.strftime("%Y-%m-%dT%H:%M:%S")
        publish(readme, paths.REPORT / "sparsity_curves.png", README_IMAGE,
                lambda image: readme_fragment(runs, when, image, comparisons, judged), README_START, README_END)
    missing = [r.label for r in runs if r.metrics is None]
    console.print(f"report -> {paths.REPORT}/results.md" + (f" (missing: {', '.join(missing)})" if missing else ""))
