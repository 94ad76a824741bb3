"""recipe_split: cut the sweep's dev questions into a tuning half and a confirmation half (seeded, per task)."""

from pathlib import Path

from fang.core import paths
from fang.core.atomic import read_json, write_json
from fang.core.outputs import guard_output
from fang.core.params import load_block
from fang.core.progress import console
from fang.evaluation.halves import HALVES, evaluated_questions, split_questions


def run(params_path: str = "params.yaml", dense: str = str(paths.SWEEP / "dense.metrics.json"),
        out: str = str(paths.RECIPE / "halves.json")) -> None:
    p = load_block("recipe", path=params_path)
    out_file = guard_output(out, "question_split", "--out", [dense])
    halves = split_questions(evaluated_questions(read_json(Path(dense))), p.seed)
    counts = {h: {t: len(ids) for t, ids in halves[h].items()} for h in HALVES}
    write_json(out_file, {"seed": p.seed, "questions_from": dense, "counts": counts, "halves": halves})
    console.print(", ".join(f"{h}: {sum(c.values()):,} questions" for h, c in counts.items()) + f" -> {out_file}")
