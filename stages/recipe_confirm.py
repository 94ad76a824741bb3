"""recipe_confirm: the chosen recipe against every baseline, paired, on the confirmation half (once)."""

from pathlib import Path

from fang.core import paths
from fang.core.atomic import read_json, write_json
from fang.core.errors import require
from fang.core.outputs import guard_output
from fang.core.params import load_block
from fang.core.progress import console
from fang.evaluation.recipe import confirm

CONFIRM = paths.RECIPE / "confirm"  # the chosen recipe's confirmation-half metrics, when it is not a sweep row


def run(params_path: str = "params.yaml", out: str = str(paths.RECIPE / "confirmation.json")) -> None:
    from fang.evaluation.evaluate import evaluate_model

    p = load_block("recipe", path=params_path)
    search_file, halves_file = paths.RECIPE / "search.json", paths.RECIPE / "halves.json"
    out_file = guard_output(out, "recipe_confirmation", "--out", [search_file, halves_file])
    choice = read_json(search_file)["choice"]["recipe"]
    confirmation = read_json(halves_file)["halves"]["confirmation"]
    chosen, evaluated = {}, []
    CONFIRM.mkdir(parents=True, exist_ok=True)
    for s in p.confirm_sparsities:
        if choice in p.sweep_candidates:  # a sweep row: its metrics cover every dev question
            src = paths.SWEEP / f"{choice}-{s}.metrics.json"
            require(src.is_file(), f"{src} is missing: run `dvc repro studies/sweep/dvc.yaml` first")
            chosen[s] = read_json(src)
            continue
        model_dir = paths.RECIPE_CELLS / f"{choice}-{s}"
        require(model_dir.is_dir(), f"{model_dir} is missing: run `dvc repro studies/recipe/dvc.yaml` first")
        metrics_file = CONFIRM / f"{choice}-{s}.metrics.json"
        metrics = evaluate_model(model_dir, load_block("evaluate", path=params_path),
                                 load_block("model", path=params_path).offload, questions=confirmation)
        metrics["questions"] = {"split": str(halves_file), "half": "confirmation"}
        write_json(metrics_file, metrics)
        chosen[s], evaluated = metrics, evaluated + [metrics_file.name]
    # the folder is this stage's DVC output: say what it holds (nothing when the choice is a sweep row)
    write_json(CONFIRM / "index.json", {"recipe": choice, "evaluated": evaluated})
    baselines = {}
    for b in p.baselines:
        for s in p.confirm_sparsities:
            src = paths.SWEEP / f"{b}-{s}.metrics.json"
            require(src.is_file(), f"{src} is missing: run `dvc repro studies/sweep/dvc.yaml` first")
            baselines[(b, s)] = read_json(src)
    result = confirm(choice, chosen, baselines, confirmation)
    write_json(out_file, result | {"half": "confirmation", "seed": p.seed})
    for v in result["verdicts"]:
        a = v["avg7"]
        console.print(f"{choice} vs {v['baseline']} at {v['sparsity']:.0%}: Avg7 {100 * a['estimate']:+.1f} "
                      f"[{100 * a['low']:+.1f}, {100 * a['high']:+.1f}] {a['verdict']}")
