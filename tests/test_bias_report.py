"""The calibration-bias report: ID/OOD arithmetic, summaries, and missing runs reported as missing."""

import math

import pytest

from fang.bias_report import BiasRun, analyse, heatmap, id_ood, render

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
    from fang.bias_report import README_END, README_START, readme_fragment
    from fang.readme import replace_between_markers

    result = analyse([BiasRun("B", "o_fang", 0.3, metrics({"A": 14.0, "B": 21.0, "C": 7.0}))], DENSE)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{README_START}\nold numbers\n{README_END}\ntail\n")
    fragment = readme_fragment(result, DENSE, "2026-01-01T00:00:00", "docs/bias_heatmap.png")
    replace_between_markers(readme, fragment, README_START, README_END)
    text = readme.read_text()
    assert text.startswith("# title\n") and text.endswith(f"{README_END}\ntail\n") and "old numbers" not in text
    assert "| o_fang | B | 30% |" in text and "![perplexity increase" in text


def test_fang_is_compared_with_its_own_baseline_source_by_source():
    def run(source, method, by_topic, ppl=12.0, acc=0.5):
        return BiasRun(source, method, 0.3, metrics(by_topic, ppl=ppl, acc=acc))

    runs = [
        run("all", "flap", {"A": 12.0, "B": 24.0, "C": 6.0}, ppl=12.0, acc=0.40),
        run("A", "flap", {"A": 11.0, "B": 26.0, "C": 6.5}),       # OOD 1.3, 1.3; ID 1.1
        run("B", "flap", {"A": 15.0, "B": 22.0, "C": 7.5}),       # OOD 1.5, 1.5; ID 1.1
        run("all", "f_fang", {"A": 11.0, "B": 22.0, "C": 5.5}, ppl=10.8, acc=0.46),
        run("A", "f_fang", {"A": 11.0, "B": 24.0, "C": 6.0}),     # OOD 1.2, 1.2
        run("B", "f_fang", {"A": 12.0, "B": 22.0, "C": 6.0}),     # OOD 1.2, 1.2
        run("A", "obc", {"A": 11.0, "B": 24.0, "C": 6.0}),        # no o_fang: no obc comparison
    ]
    (c,) = analyse(runs, DENSE)["comparisons"]
    assert (c["method"], c["baseline"], c["sparsity"]) == ("f_fang", "flap", 0.3)
    assert c["sources"] == ["all", "A", "B"] and c["single_topic_sources"] == 2
    per_source = [1.2 / 1.3 - 1, 1.2 / 1.5 - 1]
    assert c["ood_ppl_vs_baseline"] == pytest.approx(sum(per_source) / 2)
    assert c["ood_ppl_vs_baseline_se"] == pytest.approx(abs(per_source[0] - per_source[1]) / 2)  # sd/sqrt(2)
    assert c["ood_id_ratio_diff"] == pytest.approx(((1.2 - 1.3) / 1.1 + (1.2 - 1.5) / 1.1) / 2)
    assert c["all_topics_ppl_vs_baseline"] == pytest.approx(10.8 / 12.0 - 1)
    # accuracy: +6 points on "all", 0 elsewhere
    assert c["avg_acc_diff"] == pytest.approx(0.02)
    one = math.hypot(0.05 / math.sqrt(2), 0.05 / math.sqrt(2))  # two tasks of se 0.05 -> 0.05/√2 per model
    assert c["avg_acc_diff_se"] == pytest.approx(one)  # the sources share the questions: no 1/√n
    md, _ = render(analyse(runs, DENSE), DENSE)
    assert "FANG against its baseline" in md and "| f_fang | flap | 30% | all, A, B |" in md
