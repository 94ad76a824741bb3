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
