"""bias_report: perplexity increase over dense on every topic, per method x calibration source x sparsity."""

import json
import time
from pathlib import Path

from fang.core import paths
from fang.core.atomic import atomic_dir
from fang.core.errors import require
from fang.core.markdown import publish
from fang.core.params import load_block
from fang.core.progress import console
from fang.evaluation.bias_report import BiasRun, README_END, README_START, analyse, heatmap, readme_fragment, render
from fang.evaluation.removal import CellRemoval, plot_removal_correlation, read_cell_removal, removal_correlations
from fang.evaluation.report import load_json

RESULTS_IMAGE = "bias_heatmap.png"  # committed copy of the heat map, beside the results page (docs/)


def attributed_cells(result: dict) -> list[CellRemoval]:
    """The study's models that `fang attribute-removed` has scored (<cell>.attribution.json beside the evaluation)."""
    cells = [read_cell_removal(paths.BIAS_SWEEP / r["source"] / f"{r['method']}-{r['sparsity']}.attribution.json",
                               r["method"], r["source"], r["sparsity"], r["increase_by_topic"])
             for r in result["records"] if r["status"] == "ok"]
    return [c for c in cells if c is not None]


def run(params_path: str = "params.yaml", results: str | None = None) -> None:
    p = load_block("bias", path=params_path)
    dense = load_json(paths.METRICS / "dense.json")
    require(dense is not None, f"missing {paths.METRICS / 'dense.json'}: run `dvc repro evaluate@dense` first")
    runs = []
    for method in p.methods:
        for source in p.sources:
            for sparsity in p.sparsities:
                cell = paths.BIAS_SWEEP / source / f"{method}-{sparsity}"
                # not Path.with_suffix: "flap-0.3" would lose its ".3"
                runs.append(BiasRun(source, method, sparsity, load_json(Path(f"{cell}.metrics.json")),
                                    load_json(Path(f"{cell}.prune.json"))))
    result = analyse(runs, dense)
    cells = attributed_cells(result)
    if cells:
        a = load_block("attribute", path=params_path)
        result["attribution"] = removal_correlations(cells, result["topics"], a.n_boot, a.seed)
    md, table_csv = render(result, dense)
    with atomic_dir(paths.BIAS_REPORT) as tmp:
        (tmp / "bias.md").write_text(md)
        (tmp / "bias.csv").write_text(table_csv)
        (tmp / "bias.json").write_text(json.dumps(result, indent=1))
        heatmap(result, tmp / "bias_heatmap.png")
        if cells:
            plot_removal_correlation(result["attribution"], cells, tmp / "attribution_correlation.png")
    if results:
        when = time.strftime("%Y-%m-%dT%H:%M:%S")
        publish(results, paths.BIAS_REPORT / "bias_heatmap.png", RESULTS_IMAGE,
                lambda image: readme_fragment(result, dense, when, image), README_START, README_END)
    missing = [f"{r.label} {r.sparsity}" for r in runs if r.metrics is None]
    console.print(f"bias report -> {paths.BIAS_REPORT}/bias.md" + (f" (missing: {', '.join(missing)})" if missing else ""))
