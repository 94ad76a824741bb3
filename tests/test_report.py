"""The sweep report: table layout, missing runs, the generated block of docs/results.md and the README headline."""

import pytest

from fang.core.markdown import replace_between_markers
from fang.evaluation.report import README_END, README_START, Run, readme_fragment, render

TASK = {"acc": 0.5, "acc_stderr": 0.05, "acc_norm": 0.6, "acc_norm_stderr": 0.04, "n": 100}


def metrics(ppl: float) -> dict:
    return {"ppl": ppl, "ppl_by_topic": {"A": ppl, "B": 2 * ppl}, "tasks": {"t1": TASK, "next_sentence_a": TASK}}


def test_table_reports_acc_norm_with_stderr_and_keeps_missing_runs(tmp_path):
    runs = [Run("dense", 0.0, metrics(10.0)), Run("obc", 0.3, metrics(20.0), {"achieved_sparsity": 0.3}),
            Run("obc", 0.4, None)]
    md, table_csv = render(runs)
    assert "| obc | 30% | 30.0 | 20.00 | 60.0 ± 4.0 | 60.0 ± 4.0 |" in md  # per-topic subtasks are not columns
    assert "| obc | 40% | missing: run failed or not run |" in md
    assert "obc,0.4,missing" in table_csv
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{README_START}\nold\n{README_END}\nbottom\n")
    replace_between_markers(readme, readme_fragment(runs, "2026-01-01T00:00:00", "docs/x.png"), README_START, README_END)
    text = readme.read_text()
    assert "old" not in text and "| obc | 30% |" in text and text.endswith(f"{README_END}\nbottom\n")


def test_headline_is_ppl_and_average_per_method_and_sparsity_from_the_same_table():
    from fang.evaluation.report import headline_fragment

    runs = [Run("dense", 0.0, metrics(10.0)), Run("obc", 0.3, metrics(20.0), {"achieved_sparsity": 0.3}),
            Run("obc", 0.4, None), Run("flap", 0.3, metrics(30.0)), Run("flap", 0.4, metrics(40.0))]
    text = headline_fragment(runs, "2026-01-01T00:00:00")
    assert "Dense model: perplexity 10.00, average accuracy 60.0%." in text
    assert "| method | 30% sparsity | 40% sparsity |" in text
    assert "| obc | 20.00 / 60.0 | missing |" in text and "| flap | 30.00 / 60.0 | 40.00 / 60.0 |" in text
    assert "docs/results.md#" in text and "dense |" not in text  # dense is the sentence, not a row


def test_averages_and_paired_verdicts_leave_out_tasks_without_signal_on_dense():
    from fang.evaluation.report import compare_runs, kept_tasks, table_rows
    from fang.evaluation.task_screen import Candidate

    def run(name, good, flat):  # per-question scores on an informative task and an uninformative one
        ex = lambda xs: {"doc_id": list(range(len(xs))), "acc": xs}
        tasks = {"good": {"acc": sum(good) / 4, "acc_stderr": 0.1, "acc_norm": None, "per_example": ex(good)},
                 "flat": {"acc": sum(flat) / 4, "acc_stderr": 0.1, "acc_norm": None, "per_example": ex(flat)}}
        windows = {"nll": {"People": [2.0, 2.5, 3.0]}, "tokens_per_window": 10}
        return Run(name, 0.3, {"ppl": 10.0, "tasks": tasks, "ppl_windows": windows})

    a, b = run("obc", [1, 1, 1, 1], [0, 0, 0, 0]), run("o_fang", [1, 1, 1, 1], [1, 1, 1, 1])
    judged = {"good": Candidate("good", 4, 2, 0.5), "flat": Candidate("flat", 4, 2, 0.5)}
    judged["good"].decision, judged["flat"].decision = "kept", "dropped: the same answer on 100% of questions"
    averaged = kept_tasks(judged)
    header, rows, records = table_rows([a, b], averaged)
    assert header[-3:] == ["good", "flat †", "Avg"]
    assert records[1]["avg"] == 1.0  # the +100 points on "flat" are shown, not averaged
    res = compare_runs(a, b, averaged)
    assert res["accuracy"]["flat"]["estimate"] == 1.0  # per task: still compared
    assert res["accuracy"]["average_all"]["estimate"] == 0.0
    assert compare_runs(a, b)["accuracy"]["average_all"]["estimate"] == 0.5  # without a judgement: every task
    md, _ = render([a, b], judged=judged)
    assert "left out of Avg (†): flat (the same answer on 100% of questions)" in md


def test_report_correlates_removed_selective_neurons_with_topic_perplexity(tmp_path, monkeypatch):
    # planted: the topic whose selective neurons a cell removed most is the one whose perplexity rose most
    import json
    import math

    import stages.report as stage
    from fang.core import paths

    monkeypatch.setattr(paths, "SWEEP", tmp_path)
    (tmp_path.parent / "params.yaml").write_text("attribute:\n  n_boot: 200\n  seed: 0\n")
    topics = ["A", "B", "C", "D"]
    dense = {"ppl": 10.0, "ppl_by_topic": {t: 10.0 for t in topics}, "tasks": {}}
    runs = [Run("dense", 0.0, dense)]
    for sp, scale in ((0.2, 1.0), (0.3, 2.0)):
        removed = {"A": 0.1, "B": 0.2, "C": 0.3, "D": 0.4}
        ppl = {t: 10.0 * math.exp(scale * removed[t]) for t in topics}
        runs.append(Run("obc", sp, {"ppl": 12.0, "ppl_by_topic": ppl, "tasks": {}}))
        (tmp_path / f"obc-{sp}.attribution.json").write_text(json.dumps(
            {"topics": {t: {"selective_removed_fraction": removed[t], "mass_lost": removed[t] / 2} for t in topics}}))
    runs.append(Run("flap", 0.3, {"ppl": 12.0, "ppl_by_topic": dense["ppl_by_topic"], "tasks": {}}))  # not attributed
    section, cells = stage.attribution_section(runs, str(tmp_path.parent / "params.yaml"))
    assert [c.sparsity for c in cells] == [0.2, 0.3]
    assert cells[1].increase["D"] == pytest.approx(math.exp(0.8) - 1)
    (obc,) = section["methods"]
    assert obc["method"] == "obc" and obc["models"] == 2 and obc["removed"]["r"] == pytest.approx(3 / math.sqrt(10))  # pooled, centred per cell: y = x and y = 2x
    assert stage.attribution_section([Run("dense", 0.0, None)], "unused") == (None, [])


def test_verdict_lines_state_each_pair_from_its_intervals():
    from fang.evaluation.report import verdict_lines

    def cmp(est, lo, hi, higher_is_better=True):
        word = "no detectable difference"
        if lo > 0 or hi < 0:
            word = "better" if (lo > 0) == higher_is_better else "worse"
        return {"estimate": est, "low": lo, "high": hi, "verdict": word}

    comps = [{"method": "o_fang", "baseline": "obc", "sparsity": 0.4,
              "perplexity": {"overall": cmp(-0.05, -0.08, -0.02, False)},
              "accuracy": {"average_all": cmp(0.01, -0.01, 0.03), "average_in_domain": cmp(0.031, 0.01, 0.05)}},
             {"method": "o_fang", "baseline": "obc", "sparsity": 0.3,
              "perplexity": {"overall": cmp(0.112, 0.095, 0.13, False)},
              "accuracy": {"average_all": cmp(0.002, -0.017, 0.022), "average_in_domain": cmp(0.0, -0.02, 0.02)}},
             {"method": "gprune", "baseline": "wanda_sp", "sparsity": 0.3, "error": "old metrics"}]
    assert verdict_lines(comps) == [
        "- **o_fang vs obc**: 30%: PPL **worse** (+11.2%), accuracy no detectable difference (+0.2 points); "
        "40%: PPL **better** (-5.0%), accuracy no detectable difference (+1.0 points), in-domain **better** (+3.1 points)."]


def test_plot_draws_perplexity_when_no_task_carries_signal(tmp_path):
    # a tiny or random model: every task fails the screen's rule on dense, so there is no average
    from fang.evaluation.report import plot

    runs = [Run("dense", 0.0, metrics(10.0)), Run("obc", 0.3, metrics(20.0)), Run("obc", 0.4, None)]
    plot(runs, tmp_path / "curves.png", averaged=[])
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_seven_task_average_retention_and_the_papers_rows():
    from fang.data.paper_tasks import PAPER_TASKS
    from fang.evaluation.report import compare_runs, paired_table, table_rows

    def run(name, sparsity, right):  # `right` questions of 4 correct on every paper task, all on next_sentence
        ex = {"doc_id": [0, 1, 2, 3], "acc": [1.0] * right + [0.0] * (4 - right)}
        tasks = {t: {"acc": right / 4, "acc_stderr": 0.1, "acc_norm": None, "per_example": ex} for t in PAPER_TASKS}
        tasks["next_sentence"] = {"acc": 1.0, "acc_stderr": 0.0, "acc_norm": None,
                                  "per_example": {"doc_id": [0, 1], "acc": [1.0, 1.0]}}
        windows = {"nll": {"People": [2.0, 2.5, 3.0]}, "tokens_per_window": 10}
        return Run(name, sparsity, {"ppl": 10.0, "tasks": tasks, "ppl_windows": windows})

    dense, pruned = run("dense", 0.0, 4), run("obc", 0.3, 3)
    header, rows, records = table_rows([dense, pruned])
    assert header[-3:] == ["Avg7", "retention", "Avg"]
    assert records[1]["avg7"] == 0.75 and records[1]["retention"] == 0.75  # next_sentence is not in Avg7
    assert records[1]["avg"] == pytest.approx((7 * 0.75 + 1.0) / 8)
    assert rows[1][-2] == "75.0%"
    c = compare_runs(dense, pruned)
    assert c["accuracy"]["average_avg7"]["estimate"] == pytest.approx(-0.25)
    p_header, _ = paired_table([{"method": "obc", "baseline": "x", "sparsity": 0.3, **c}])
    assert "Avg7 (points)" in p_header
    md, _ = render([dense, pruned])
    assert "the seed paper's LLaMA-2-7B rows" in md and "| O-FANG | 59.83 | 89.7% | 54.96 | 82.4% |" in md
    # without all seven tasks there is no Avg7 (a partial average would not sit beside the paper's)
    partial = Run("dense", 0.0, {"ppl": 1.0, "tasks": {"boolq": {"acc": 1.0, "acc_stderr": 0.0}}})
    assert "Avg7" not in table_rows([partial])[0]


def test_report_stage_publishes_the_block_and_plot_into_the_results_page_and_the_headline_into_the_readme(
        tmp_path, monkeypatch):
    import json
    from pathlib import Path

    import yaml

    import stages.report as stage
    from fang.evaluation.report import HEADLINE_END, HEADLINE_START

    monkeypatch.chdir(tmp_path)
    sweep = Path("artifacts/sweep")
    sweep.mkdir(parents=True)
    (sweep / "dense.metrics.json").write_text(json.dumps(metrics(10.0)))
    (sweep / "obc-0.3.metrics.json").write_text(json.dumps(metrics(20.0)))
    (sweep / "obc-0.3.prune.json").write_text(json.dumps({"achieved_sparsity": 0.3}))
    Path("params.yaml").write_text(yaml.safe_dump({"sweep": {"methods": ["obc"], "sparsities": [0.3]}}))
    Path("docs").mkdir()
    page, readme = Path("docs/results.md"), Path("README.md")
    page.write_text(f"# results\n{README_START}\nold table\n{README_END}\n")
    readme.write_text(f"# fang\n{HEADLINE_START}\nold headline\n{HEADLINE_END}\nlayout\n")
    stage.run("params.yaml", str(page), str(readme))
    text = page.read_text()
    assert "old table" not in text and "| obc | 30% | 30.0 | 20.00 |" in text and "](sparsity_curves.png)" in text
    assert Path("docs/sparsity_curves.png").stat().st_size > 1000  # beside the page, where its link points
    head = readme.read_text()
    assert "old headline" not in head and "| obc | 20.00 / 60.0 |" in head and head.endswith(f"{HEADLINE_END}\nlayout\n")
    assert "| obc | 30% |" not in head  # the full table stays on the results page
