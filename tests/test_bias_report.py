"""The calibration-bias report: ID/OOD arithmetic, summaries, and missing runs reported as missing."""

import math

import pytest

from fang.evaluation.bias_report import BiasRun, analyse, heatmap, id_ood, render

DENSE = {"ppl": 10.0, "ppl_by_topic": {"A": 10.0, "B": 20.0, "C": 5.0}}


def metrics(ppl_by_topic: dict, ppl: float = 12.0, acc: float = 0.5) -> dict:
    task = {"acc": acc, "acc_stderr": 0.05, "acc_norm": acc, "acc_norm_stderr": 0.05, "n": 100}
    return {"ppl": ppl, "ppl_by_topic": ppl_by_topic, "tasks": {"t1": task, "t2": task}}


def test_id_ood_of_a_single_topic_source():
    run = BiasRun("A", "flap", 0.3, metrics({"A": 11.0, "B": 24.0, "C": 6.25}))
    stats = id_ood(run, DENSE)
    assert stats["id"] == pytest.approx(0.1)
    # geometric mean of the OOD ratios 1.2 and 1.25
    assert stats["ood"] == pytest.approx(math.sqrt(1.2 * 1.25) - 1)
    assert stats["ood_id_ratio"] == pytest.approx(math.sqrt(1.2 * 1.25) / 1.1)
    assert stats["by_topic"] == pytest.approx({"A": 0.1, "B": 0.2, "C": 0.25})


def test_all_topics_source_has_no_ood():
    stats = id_ood(BiasRun("all", "flap", 0.3, metrics({"A": 11.0, "B": 22.0, "C": 5.5}, ppl=11.0)), DENSE)
    assert stats["id"] == pytest.approx(0.1) and stats["ood"] is None and stats["ood_id_ratio"] is None


def test_unknown_calibration_topic_is_named():
    with pytest.raises(ValueError, match="'Z'"):
        id_ood(BiasRun("Z", "flap", 0.3, metrics({"A": 11.0})), DENSE)


def test_summary_is_mean_and_spread_over_single_topic_sources():
    runs = [
        BiasRun("all", "obc", 0.3, metrics({"A": 11.0, "B": 22.0, "C": 5.5}, ppl=11.0, acc=0.6)),
        BiasRun("A", "obc", 0.3, metrics({"A": 10.5, "B": 24.0, "C": 6.0})),  # OOD 1.2, 1.2 -> +20%
        BiasRun("B", "obc", 0.3, metrics({"A": 14.0, "B": 21.0, "C": 7.0})),  # OOD 1.4, 1.4 -> +40%
    ]
    (summary,) = analyse(runs, DENSE)["summaries"]
    assert summary["sources"] == 2 and summary["missing"] == []
    assert summary["ood_increase_mean"] == pytest.approx(0.3)
    assert summary["ood_increase_sd"] == pytest.approx(math.sqrt(0.02))  # sample sd of 0.2 and 0.4
    assert summary["all_topics_increase"] == pytest.approx(0.1)
    assert summary["all_topics_avg_acc"] == pytest.approx(0.6)
    assert summary["avg_acc_mean"] == pytest.approx(0.5)
    assert summary["avg_acc_stderr"] == pytest.approx(0.05 / math.sqrt(2))  # mean of the per-source se, not / √n


def test_a_missing_run_is_reported_not_dropped(tmp_path):
    runs = [
        BiasRun("all", "f_fang", 0.4, metrics({"A": 11.0, "B": 22.0, "C": 5.5})),
        BiasRun("A", "f_fang", 0.4, None),  # the run failed: no metrics file
        BiasRun("B", "f_fang", 0.4, metrics({"A": 14.0, "B": 21.0, "C": 7.0})),
    ]
    result = analyse(runs, DENSE)
    assert [r["status"] for r in result["records"]] == ["ok", "missing", "ok"]
    assert result["summaries"][0]["missing"] == ["A"] and result["summaries"][0]["sources"] == 1
    md, table_csv = render(result, DENSE)
    assert "**Missing runs**" in md and "f_fang / A / 40%" in md
    assert "missing: run failed or not run" in md
    assert "1 (1 missing)" in md
    assert len(table_csv.strip().splitlines()) == 1 + 3  # header + every run, the missing one included
    assert "f_fang,A,0.4,missing" in table_csv
    heatmap(result, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_render_marks_the_calibration_topic_cell():
    result = analyse([BiasRun("B", "o_fang", 0.3, metrics({"A": 14.0, "B": 21.0, "C": 7.0}))], DENSE)
    md, _ = render(result, DENSE)
    assert "**+5.0%**" in md  # B's own cell: 21 / 20 - 1
    assert "+40.0%" in md  # A: 14 / 10 - 1, not bold


def test_readme_fragment_replaces_only_the_bias_block(tmp_path):
    from fang.evaluation.bias_report import README_END, README_START, readme_fragment
    from fang.core.markdown import replace_between_markers

    result = analyse([BiasRun("B", "o_fang", 0.3, metrics({"A": 14.0, "B": 21.0, "C": 7.0}))], DENSE)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{README_START}\nold numbers\n{README_END}\ntail\n")
    fragment = readme_fragment(result, DENSE, "2026-01-01T00:00:00", "docs/bias_heatmap.png")
    replace_between_markers(readme, fragment, README_START, README_END)
    text = readme.read_text()
    assert text.startswith("# title\n") and text.endswith(f"{README_END}\ntail\n") and "old numbers" not in text
    assert "| o_fang | B | 30% |" in text and "![perplexity increase" in text


TPW = 50  # tokens per perplexity window
BASE_NLL = {t: [100.0 + 7 * i + 13 * j for i in range(5)] for j, t in enumerate(("A", "B", "C"))}


def windowed(by_topic: dict, ppl: float = 12.0, correct: list[int] | None = None) -> dict:
    """Metrics whose every window of topic t has NLL = base + TPW * log(PPL_t / PPL_dense_t), so any
    ratio between two such models is exact on every resample; per-question scores for two tasks."""
    m = metrics(by_topic, ppl=ppl, acc=0.5)
    m["ppl_windows"] = {"nll": {t: [v + TPW * math.log(by_topic[t] / DENSE["ppl_by_topic"][t]) for v in BASE_NLL[t]]
                                for t in by_topic}, "tokens_per_window": TPW}
    correct = correct if correct is not None else [0, 1] * 20
    for t in ("t1", "t2"):
        m["tasks"][t] = {**m["tasks"][t], "per_example": {"doc_id": list(range(len(correct))),
                                                           "acc_norm": [float(c) for c in correct]}}
    return m


def test_fang_is_compared_with_its_own_baseline_source_by_source():
    def run(source, method, by_topic, ppl=12.0, correct=None):
        return BiasRun(source, method, 0.3, windowed(by_topic, ppl=ppl, correct=correct))

    better = [1, 1] * 20  # right on every question where the baseline got half
    runs = [
        run("all", "flap", {"A": 12.0, "B": 24.0, "C": 6.0}, ppl=12.0),
        run("A", "flap", {"A": 11.0, "B": 26.0, "C": 6.5}),       # OOD 1.3, 1.3; ID 1.1
        run("B", "flap", {"A": 15.0, "B": 22.0, "C": 7.5}),       # OOD 1.5, 1.5; ID 1.1
        run("all", "f_fang", {"A": 11.0, "B": 22.0, "C": 5.5}, ppl=10.8, correct=better),
        run("A", "f_fang", {"A": 11.0, "B": 24.0, "C": 6.0}),     # OOD 1.2, 1.2
        run("B", "f_fang", {"A": 12.0, "B": 22.0, "C": 6.0}),     # OOD 1.2, 1.2
        run("A", "obc", {"A": 11.0, "B": 24.0, "C": 6.0}),        # no o_fang: no obc comparison
    ]
    (c,) = analyse(runs, DENSE)["comparisons"]
    assert (c["method"], c["baseline"], c["sparsity"]) == ("f_fang", "flap", 0.3)
    assert c["sources"] == ["A", "B", "all"] and c["single_topic_sources"] == 2
    # geometric mean over sources of the OOD ratio FANG / baseline: exact, so the interval is a point
    ood = c["ood_ppl_vs_baseline"]
    assert ood["estimate"] == pytest.approx(math.sqrt(1.2 / 1.3 * 1.2 / 1.5) - 1)
    assert ood["low"] == pytest.approx(ood["estimate"]) and ood["verdict"] == "better"
    assert c["id_ppl_vs_baseline"]["estimate"] == pytest.approx(0.0, abs=1e-12)  # ID 1.1 for both
    assert c["ood_id_gap_vs_baseline"]["estimate"] == pytest.approx(ood["estimate"])
    assert c["all_topics_ppl_vs_baseline"]["estimate"] == pytest.approx(math.expm1(
        sum(TPW * 5 * math.log(r) for r in (11 / 12, 22 / 24, 5.5 / 6)) / (3 * 5 * TPW)))
    # accuracy: +50 points on the "all" source, 0 on the others -> mean over 3 sources
    acc = c["avg_acc_diff"]
    assert acc["estimate"] == pytest.approx(0.5 / 3)
    assert acc["low"] > 0 and acc["verdict"] == "better"
    md, _ = render(analyse(runs, DENSE), DENSE)
    assert "against its baseline" in md and "| f_fang | flap | 30% | A, B, all |" in md


def test_old_metrics_without_per_window_scores_are_reported_not_crashed():
    runs = [BiasRun("A", "obc", 0.3, metrics({"A": 11.0, "B": 24.0, "C": 6.0})),
            BiasRun("A", "o_fang", 0.3, metrics({"A": 11.0, "B": 23.0, "C": 6.0}))]
    (c,) = analyse(runs, DENSE)["comparisons"]
    assert "per-window" in c["error"]
    md, _ = render(analyse(runs, DENSE), DENSE)
    assert "per-window" in md


def test_bias_verdict_lines_read_the_words_from_the_intervals():
    from fang.evaluation.bias_report import bias_verdict_lines

    def ci(est, lo, hi, word):
        return {"estimate": est, "low": lo, "high": hi, "verdict": word}

    comparisons = [
        {"method": "f_fang", "baseline": "flap", "sparsity": 0.4, "sources": ["A", "all"],
         "ood_ppl_vs_baseline": ci(-0.2, -0.3, -0.1, "better"),
         "ood_id_gap_vs_baseline": ci(0.01, -0.02, 0.04, "no detectable difference"),
         "all_topics_ppl_vs_baseline": ci(0.05, 0.02, 0.08, "worse")},
        {"method": "f_fang", "baseline": "flap", "sparsity": 0.3, "sources": ["A"],
         "ood_ppl_vs_baseline": ci(0.1, 0.05, 0.15, "worse")},
        {"method": "gprune", "baseline": "wanda_sp", "sparsity": 0.3, "error": "no windows"},
    ]
    lines = bias_verdict_lines(comparisons)
    assert lines == ["- **f_fang vs flap**: 30%: OOD PPL **worse** (+10.0%); 40%: OOD PPL **better** (-20.0%), "
                     "OOD/ID gap no detectable difference (+1.0%), all-topics PPL **worse** (+5.0%)."]
