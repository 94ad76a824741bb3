"""The sweep report: table layout, missing runs, and the generated README block."""

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
    assert "left out of every average (†): flat (the same answer on 100% of questions)" in md
