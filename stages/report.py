"""report: one table of every method x sparsity of the sweep (plus dense), as Markdown, CSV and a PNG."""

import time

from fang.core import paths
from fang.core.atomic import atomic_file, write_json
from fang.core.markdown import publish
from fang.core.params import SweepParams, load_block
from fang.core.progress import console
from fang.evaluation.report import (
    README_END,
    README_START,
    Run,
    load_json,
    paired_comparisons,
    plot,
    readme_fragment,
    render,
)

README_IMAGE = "docs/sparsity_curves.png"  # committed copy of the plot the README shows


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
    comparisons = paired_comparisons(runs, list(p.methods), list(p.sparsities))
    write_json(paths.REPORT / "paired.json", {"pairs": comparisons})
    md, table_csv = render(runs, comparisons)
    with atomic_file(paths.REPORT / "results.md") as fh:
        fh.write(md)
    with atomic_file(paths.REPORT / "results.csv") as fh:
        fh.write(table_csv)
    plot(runs, paths.REPORT / "sparsity_curves.png")
    if readme:
        when = time.strftime("%Y-%m-%dT%H:%M:%S")
        publish(readme, paths.REPORT / "sparsity_curves.png", README_IMAGE,
                lambda image: readme_fragment(runs, when, image, comparisons), README_START, README_END)
    missing = [r.label for r in runs if r.metrics is None]
    console.print(f"report -> {paths.REPORT}/results.md" + (f" (missing: {', '.join(missing)})" if missing else ""))
