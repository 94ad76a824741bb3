"""recipe_select: score every candidate on the tuning half against the baselines; choose one recipe."""

from pathlib import Path

from fang.core import paths
from fang.core.atomic import read_json, write_json
from fang.core.errors import require
from fang.core.outputs import guard_output
from fang.core.params import load_block
from fang.core.progress import console
from fang.evaluation.recipe import choose, search_table


def cell_metrics(name: str, sparsity: float, from_sweep: bool, suffix: str = "metrics") -> Path:
    """Where a candidate's or baseline's metrics are: the sweep's (all dev questions) or the study's (tuning half)."""
    folder = paths.SWEEP if from_sweep else paths.RECIPE_CELLS
    path = folder / f"{name}-{sparsity}.{'metrics' if from_sweep else suffix}.json"
    require(path.is_file(), f"{path} is missing: run `dvc repro {'studies/sweep' if from_sweep else 'studies/recipe'}/dvc.yaml` first")
    return path


def run(params_path: str = "params.yaml", out: str = str(paths.RECIPE / "search.json")) -> None:
    p = load_block("recipe", path=params_path)
    halves_file = paths.RECIPE / "halves.json"
    out_file = guard_output(out, "recipe_search", "--out", [halves_file])
    tuning = read_json(halves_file)["halves"]["tuning"]
    candidates = {(c, s): read_json(cell_metrics(c, s, from_sweep=False, suffix="tuning"))
                  for c in p.candidates + p.analysis_candidates() for s in p.sparsities}
    candidates |= {(c, s): read_json(cell_metrics(c, s, from_sweep=True)) for c in p.sweep_candidates for s in p.sparsities}
    baselines = {(b, s): read_json(cell_metrics(b, s, from_sweep=True)) for b in p.baselines for s in p.sparsities}
    table = search_table(candidates, baselines, tuning)
    choice = choose(table, p.sparsities)
    write_json(out_file, {"half": "tuning", "seed": p.seed, "table": table, "choice": choice})
    console.print(f"chosen on the tuning half: {choice['recipe']} (mean Avg7 {100 * choice['mean_avg7']:.1f} over "
                  f"{', '.join(f'{s:.0%}' for s in p.sparsities)}) of {len(choice['ranking'])} -> {out_file}")
