"""Paired verdicts between evaluations that are not sweep rows (an ablation against the rows it ablates).

For each `A B` pair of `fang evaluate` JSONs scored on the same questions and text windows: B - A on the
seven-task average (paired bootstrap over shared questions) and on perplexity (paired over windows), with
the report's verdict words. Writes the JSON given by --out (under artifacts/diagnostics/); numbers in the docs
are read from it.

    python studies/diagnostics/pair.py --out artifacts/diagnostics/NAME.json A.json B.json [A2.json B2.json ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fang.core.atomic import read_json, write_json  # noqa: E402
from fang.core.errors import require  # noqa: E402
from fang.evaluation.paired import perplexity_differences  # noqa: E402
from fang.evaluation.recipe import paired_average, seven_task_average  # noqa: E402
from fang.evaluation.report import paper_tasks_in  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    require(len(a.files) % 2 == 0, "give the evaluations in pairs: A B [A2 B2 ...]")
    rows = []
    for fa, fb in zip(a.files[::2], a.files[1::2]):
        ma, mb = read_json(fa), read_json(fb)
        ppl = perplexity_differences(ma["ppl_windows"], mb["ppl_windows"])["overall"].as_dict()
        row = {"a": fa, "b": fb, "ppl_a": ma["ppl"], "ppl_b": mb["ppl"], "ppl": ppl}
        # a perplexity-only evaluation (`fang evaluate --task-limit -1`) pairs on perplexity alone
        if paper_tasks_in(list(ma.get("tasks", {}))) and paper_tasks_in(list(mb.get("tasks", {}))):
            row |= {"avg7_a": seven_task_average(ma), "avg7_b": seven_task_average(mb), "avg7": paired_average(ma, mb)}
        rows.append(row)
        words = f"PPL {mb['ppl']:.2f} vs {ma['ppl']:.2f}, {100 * ppl['estimate']:+.1f}% " \
                f"[{100 * ppl['low']:+.1f}, {100 * ppl['high']:+.1f}] {ppl['verdict']}"
        if "avg7" in row:
            d = row["avg7"]
            words = f"Avg7 {100 * d['estimate']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] {d['verdict']}; " + words
        print(f"{fb} vs {fa}: {words}")
    write_json(Path(a.out), {"pairs": rows})
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
