"""The one-screen summary: dense and pruned numbers side by side, with the change between them."""

from __future__ import annotations

from fang.evaluation.summary import render, summarize


def _metrics(ppl, accs, block):
    return {"ppl": ppl, "block_params": block,
            "tasks": {t: {"acc": a, "acc_stderr": 0.01} for t, a in accs.items()}}


def test_summary_pairs_every_number_and_renders_changes():
    dense = _metrics(17.0, {"bb_winowhy": 0.55, "next_sentence": 0.60, "next_sentence_People": 0.7}, 1000)
    pruned = _metrics(34.0, {"bb_winowhy": 0.50, "next_sentence": 0.50, "next_sentence_People": 0.6}, 700)
    sizes = {"dense": {"block_params": 1000, "total_params": 1500, "checkpoint_bytes": 4 * 2**20},
             "pruned": {"block_params": 700, "total_params": 1200, "checkpoint_bytes": 3 * 2**20}}
    speed = {"dense": {"prefill_tok_s": 100.0, "decode_tok_s": 10.0},
             "pruned": {"prefill_tok_s": 150.0, "decode_tok_s": 12.0},
             "setup": {"prompt_len": 128, "new_tokens": 32, "repeats": 3, "device": "cpu"}}
    prune = {"method": "o_fang", "target_sparsity": 0.3, "achieved_sparsity": 0.3}
    s = summarize(dense, pruned, prune, sizes, speed)
    assert s["rows"]["perplexity"] == {"dense": 17.0, "pruned": 34.0}
    # per-topic next-sentence subtasks stay out of the headline average
    assert abs(s["rows"]["accuracy (avg of tasks)"]["dense"] - 0.575) < 1e-12
    assert abs(s["rows"]["accuracy (avg of tasks)"]["pruned"] - 0.50) < 1e-12
    text = render(s)
    assert "| perplexity | 17.0 | 34.0 | x2.00 |" in text
    assert "| accuracy (avg of tasks) | 57.5% ± 0.7 | 50.0% ± 0.7 | -7.5 pts |" in text
    assert "| decode tokens/s | 10.0 | 12.0 | x1.20 |" in text
    assert "| checkpoint MiB | 4.0 | 3.0 | x0.75 |" in text
    assert len(text.splitlines()) < 25  # one screen


def test_summary_without_timing_has_no_speed_rows():
    m = _metrics(10.0, {"t": 0.5}, 10)
    sizes = {k: {"block_params": 10, "total_params": None, "checkpoint_bytes": 2**20} for k in ("dense", "pruned")}
    s = summarize(m, m, {"method": "flap", "target_sparsity": 0.2, "achieved_sparsity": 0.2}, sizes, None)
    assert "decode tokens/s" not in s["rows"] and "| all parameters | — | — |  |" in render(s)


def test_summary_heads_with_the_papers_seven_task_average_when_all_seven_ran():
    from fang.data.paper_tasks import PAPER_TASKS

    dense = _metrics(10.0, {**{t: 0.6 for t in PAPER_TASKS}, "next_sentence": 0.9}, 10)
    pruned = _metrics(12.0, {**{t: 0.5 for t in PAPER_TASKS}, "next_sentence": 0.9}, 7)
    sizes = {k: {"block_params": 10, "total_params": None, "checkpoint_bytes": 2**20} for k in ("dense", "pruned")}
    s = summarize(dense, pruned, {"method": "o_fang", "target_sparsity": 0.3, "achieved_sparsity": 0.3}, sizes, None)
    row = s["rows"]["accuracy (paper's 7-task avg)"]
    assert abs(row["dense"] - 0.6) < 1e-12 and abs(row["pruned"] - 0.5) < 1e-12  # next_sentence is not in it
    text = render(s)
    assert "| accuracy (paper's 7-task avg) | 60.0% ± 0.4 | 50.0% ± 0.4 | -10.0 pts |" in text
    assert all(f"|   {t} |" in text for t in PAPER_TASKS) and "|   next_sentence |" in text
