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


def reusable(path: Path, model_dir: Path, halves_file: Path) -> dict | None:
    """A confirmation-half evaluation of `model_dir` written earlier by `fang evaluate --questions HALVES --half
    confirmation --out PATH` (e.g. while the last tuning cells ran), or None when there is no such file. A file for
    another model, another half or split, or older than the model is an error, not silently re-scored."""
    if not path.is_file():
        return None
    metrics = read_json(path)
    require(metrics.get("questions") == {"split": str(halves_file), "half": "confirmation"},
            f"{path} is not a confirmation-half evaluation of {halves_file} (its questions: {metrics.get('questions')})")
    require(metrics.get("model") == str(model_dir), f"{path} evaluated {metrics.get('model')!r}, not {model_dir}")
    require(path.stat().st_mtime >= (model_dir / "structure.json").stat().st_mtime,
            f"{path} is older than {model_dir}: the model was pruned again after it; evaluate it again")
    return metrics


def run(params_path: str = "params.yaml", out: str = str(paths.RECIPE / "confirmation.json"),
        reuse: str | None = None) -> None:
    """Confirm the choice; with `reuse`, a folder of confirmation-half evaluations already written for the choice's
    models (`<recipe>-<sparsity>.metrics.json`, checked by `reusable`) is taken instead of evaluating again."""
    from fang.evaluation.evaluate import evaluate_model

    p = load_block("recipe", path=params_path)
    search_file, halves_file = paths.RECIPE / "search.json", paths.RECIPE / "halves.json"
    out_file = guard_output(out, "recipe_confirmation", "--out", [search_file, halves_file])
    choice = read_json(search_file)["choice"]["recipe"]
    confirmation = read_json(halves_file)["halves"]["confirmation"]
    chosen, evaluated, reused = {}, [], []
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
        metrics = reusable(Path(reuse) / metrics_file.name, model_dir, halves_file) if reuse else None
        if metrics is not None:
            reused.append(metrics_file.name)
        else:
            metrics = evaluate_model(model_dir, load_block("evaluate", path=params_path),
                                     load_block("model", path=params_path).offload, questions=confirmation)
            metrics["questions"] = {"split": str(halves_file), "half": "confirmation"}
            evaluated.append(metrics_file.name)
        write_json(metrics_file, metrics)
        chosen[s] = metrics
    # the folder is this stage's DVC output: say what it holds (nothing when the choice is a sweep row)
    write_json(CONFIRM / "index.json", {"recipe": choice, "evaluated": evaluated}
               | ({"reused": reused, "reused_from": str(reuse)} if reused else {}))
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
