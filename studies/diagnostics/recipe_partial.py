"""The recipe study's search table on the cells that exist so far (tuning half only), before the whole study runs.

`recipe_select` needs every candidate; this scores whatever is there with the same code (`search_table`, every
metrics file cut to the tuning half of artifacts/recipe/halves.json): the study's own cells
(artifacts/recipe/cells/*.tuning.json) and the sweep rows in recipe.sweep_candidates, each against the sweep's
baselines (recipe.baselines) at the same sparsity. It never looks at the confirmation half. Writes
artifacts/diagnostics/recipe_partial.json; numbers in the docs are read from that file.

    python studies/diagnostics/recipe_partial.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fang.core import paths  # noqa: E402
from fang.core.atomic import read_json, write_json  # noqa: E402
from fang.core.params import load_block  # noqa: E402
from fang.evaluation.recipe import search_table  # noqa: E402

OUT = paths.ARTIFACTS / "diagnostics" / "recipe_partial.json"


def main() -> None:
    p = load_block("recipe")
    tuning = read_json(paths.RECIPE / "halves.json")["halves"]["tuning"]
    candidates = {}
    for f in sorted((paths.RECIPE / "cells").glob("*.tuning.json")):
        name, sparsity = re.fullmatch(r"(.+)-([0-9.]+)\.tuning\.json", f.name).groups()
        candidates[(name, float(sparsity))] = read_json(f)
    sparsities = sorted({s for _, s in candidates})
    for name in p.sweep_candidates:
        for s in sparsities:
            f = paths.ARTIFACTS / "sweep" / f"{name}-{s}.metrics.json"
            if f.exists():
                candidates[(name, s)] = read_json(f)
    baselines = {(b, s): read_json(paths.ARTIFACTS / "sweep" / f"{b}-{s}.metrics.json")
                 for b in p.baselines for s in sparsities
                 if (paths.ARTIFACTS / "sweep" / f"{b}-{s}.metrics.json").exists()}
    table = search_table(candidates, baselines, tuning)
    write_json(OUT, {"half": "tuning", "seed": p.seed, "table": table})
    for row in table:
        vs = ", ".join(f"{b} {100 * c['estimate']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] {c['verdict']}"
                       for b, c in row["vs"].items())
        print(f"{row['recipe']} {row['sparsity']:.0%}: Avg7 {100 * row['avg7']:.1f} ± {100 * row['avg7_se']:.1f}, "
              f"PPL {row['ppl']:.2f}; vs {vs}")
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
