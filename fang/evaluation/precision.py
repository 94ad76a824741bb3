"""Does the evaluation precision change a result? One model evaluated twice, compared paired.

fang scores models in `evaluate.dtype` (bfloat16 by default: on CPUs with AMX and on GPUs it is
several times faster than float32). A user who doubts that it matters evaluates the same model in
both precisions (`fang evaluate --dtype float32 ...`) and runs `fang compare-precision`: it reports
how many answers changed, the perplexity ratio, and the paired accuracy difference with its 95%
interval, which should read "no detectable difference".
"""

from __future__ import annotations

from ..core.errors import require
from ..core.markdown import markdown_table
from .report import Run, compare_runs, fmt_comparison, paired_examples


def same_answers(reference: dict, candidate: dict) -> dict[str, tuple[int, int]]:
    """Per leaf task with per-question predictions in both: (questions answered alike, questions in common)."""
    out = {}
    for task, entry in reference["tasks"].items():
        pa = (entry.get("per_example") or {})
        pb = (candidate["tasks"].get(task, {}).get("per_example") or {})
        if "pred" not in pa or "pred" not in pb:
            continue
        by_doc = dict(zip(pb["doc_id"], pb["pred"]))
        common = [(p, by_doc[d]) for d, p in zip(pa["doc_id"], pa["pred"]) if d in by_doc]
        out[task] = (sum(a == b for a, b in common), len(common))
    return out


def window_nll_max_relative_difference(reference: dict, candidate: dict) -> float:
    """Largest |NLL_b - NLL_a| / NLL_a over the perplexity windows both were scored on."""
    wa, wb = reference["ppl_windows"]["nll"], candidate["ppl_windows"]["nll"]
    diffs = [abs(b - a) / a for topic in wa for a, b in zip(wa[topic], wb.get(topic, [])) if a > 0]
    require(diffs, "the two evaluations share no perplexity window")
    return max(diffs)


def precision_agreement(reference: dict, candidate: dict) -> dict:
    """`candidate` (evaluated in a cheaper dtype) against `reference` (usually float32), same model.

    Both are `fang evaluate` metrics JSONs with per-question results and per-window NLL.
    """
    ra, rb = reference.get("dtype", "float32"), candidate.get("dtype", "?")
    require(reference.get("model") == candidate.get("model"),
            f"compare-precision needs one model evaluated twice, got {reference.get('model')} and {candidate.get('model')}")
    ex_a, _ = paired_examples(reference)
    ex_b, _ = paired_examples(candidate)
    require(set(ex_a) & set(ex_b), "the two evaluations share no task with per-question results")
    same = same_answers(reference, candidate)
    alike, total = sum(s for s, _ in same.values()), sum(n for _, n in same.values())
    paired = compare_runs(Run(ra, 0.0, reference), Run(rb, 0.0, candidate))
    return {
        "model": reference.get("model"),
        "reference_dtype": ra,
        "candidate_dtype": rb,
        "ppl": {ra: reference["ppl"], rb: candidate["ppl"]},
        "window_nll_max_rel_diff": window_nll_max_relative_difference(reference, candidate),
        "same_answers": {"alike": alike, "questions": total, "by_task": same},
        "paired": paired,
        "seconds": {ra: reference.get("seconds"), rb: candidate.get("seconds")},
    }


def markdown(results: list[dict]) -> str:
    """One row per model: perplexity in both dtypes, the paired changes, answers alike, seconds."""
    require(results, "compare-precision: nothing to show")
    a, b = results[0]["reference_dtype"], results[0]["candidate_dtype"]
    rows = []
    for r in results:
        sa, sb = r["seconds"][r["reference_dtype"]] or {}, r["seconds"][r["candidate_dtype"]] or {}
        same = r["same_answers"]
        rows.append([
            f"`{r['model']}`",
            f"{r['ppl'][r['reference_dtype']]:.3f} / {r['ppl'][r['candidate_dtype']]:.3f}",
            fmt_comparison(r["paired"]["perplexity"]["overall"], unit="%"),
            f"{r['window_nll_max_rel_diff']:.1e}",
            fmt_comparison(r["paired"]["accuracy"].get("average_all")),
            f"{same['alike']}/{same['questions']} ({same['alike'] / max(same['questions'], 1):.2%})",
            f"{sa.get('perplexity', '?')} + {sa.get('zero_shot', '?')} / {sb.get('perplexity', '?')} + {sb.get('zero_shot', '?')}",
        ])
    header = ["model", f"PPL {a} / {b}", "PPL change", "largest window NLL change (relative)",
              "Avg acc change (points)", "same answer", f"seconds {a} / {b} (perplexity + zero-shot)"]
    return (f"{b} against {a} on the same questions and windows; changes are {b} − {a} with a 95% paired-bootstrap "
            f"interval.\n\n" + markdown_table(header, rows))
