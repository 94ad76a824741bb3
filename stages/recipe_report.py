"""recipe_report: publish the recipe study (search table, confirmation verdicts, the default's decision)."""

from datetime import datetime

from fang.core import paths
from fang.core.atomic import atomic_file, read_json
from fang.core.errors import require
from fang.core.markdown import replace_between_markers
from fang.core.params import load_block
from fang.core.progress import console
from fang.evaluation.recipe import recipe_fragments

RESULTS_MARKERS = ("<!-- recipe:start -->", "<!-- recipe:end -->")
README_MARKERS = ("<!-- recipe-headline:start -->", "<!-- recipe-headline:end -->")


def run(results: str | None = None, readme: str | None = None, params_path: str = "params.yaml") -> None:
    search_file, confirmation_file = paths.RECIPE / "search.json", paths.RECIPE / "confirmation.json"
    for f in (search_file, confirmation_file):
        require(f.is_file(), f"{f} is missing: run `dvc repro studies/recipe/dvc.yaml` first")
    when = datetime.now().isoformat(timespec="seconds")
    default = load_block("prune", path=params_path).method  # the main job's method, which the study may replace
    page, short = recipe_fragments(read_json(search_file), read_json(confirmation_file), when, default=default)
    with atomic_file(paths.RECIPE / "recipe.md") as fh:
        fh.write(page + "\n")
    if results:
        replace_between_markers(results, page, *RESULTS_MARKERS)
    if readme:
        replace_between_markers(readme, short, *README_MARKERS)
    console.print(f"recipe report -> {paths.RECIPE / 'recipe.md'}")
