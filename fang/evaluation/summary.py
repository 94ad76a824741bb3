"""The one-screen result of `dvc repro`: dense against pruned on quality, size and speed.

Everything comes from the main pipeline's artifacts (evaluate's metrics, the prune report, the two
checkpoints) except speed, which `summarize` is handed (measured by the stage with
`fang.tools.bench.inference.measure_inference`, interleaved so both models see the same machine load).
"""

from __future__ import annotations

from .report import average, headline_tasks, paper_tasks_in, task_accuracy

AVG7_ROW = "accuracy (paper's 7-task avg)"
AVG_ROW = "accuracy (avg of tasks)"


def _avg_accuracy(metrics: dict, tasks: list[str] | None = None) -> tuple[float | None, float | None]:
    return average([task_accuracy(metrics["tasks"][t]) for t in (tasks or headline_tasks(metrics))])


def summarize(dense: dict, pruned: dict, prune: dict, sizes: dict, speed: dict | None) -> dict:
    """Dense/pruned pairs of every headline number. `sizes`: {"dense"|"pruned": {"block_params", "total_params",
    "checkpoint_bytes"}}; `speed`: {"dense"|"pruned": {"prefill_tok_s", "decode_tok_s"}} or None."""
    seven = paper_tasks_in(headline_tasks(dense))
    avg_row, avg_tasks = (AVG7_ROW, seven) if seven else (AVG_ROW, None)
    accuracy = {avg_row: (_avg_accuracy(dense, avg_tasks), _avg_accuracy(pruned, avg_tasks))}
    accuracy.update({f"  {t}": (task_accuracy(dense["tasks"][t]), task_accuracy(pruned["tasks"].get(t, {})))
                     for t in headline_tasks(dense)})
    rows = {
        "perplexity": (dense["ppl"], pruned["ppl"]),
        **{name: (d[0], p[0]) for name, (d, p) in accuracy.items()},
        "block parameters": (sizes["dense"]["block_params"], sizes["pruned"]["block_params"]),
        "all parameters": (sizes["dense"]["total_params"], sizes["pruned"]["total_params"]),
        "checkpoint MiB": (sizes["dense"]["checkpoint_bytes"] / 2**20, sizes["pruned"]["checkpoint_bytes"] / 2**20),
    }
    if speed:
        rows["prefill tokens/s"] = (speed["dense"]["prefill_tok_s"], speed["pruned"]["prefill_tok_s"])
        rows["decode tokens/s"] = (speed["dense"]["decode_tok_s"], speed["pruned"]["decode_tok_s"])
    return {
        "method": prune.get("method"),
        "target_sparsity": prune.get("target_sparsity"),
        "achieved_sparsity": prune.get("achieved_sparsity"),
        "rows": {name: {"dense": d, "pruned": p} for name, (d, p) in rows.items()},
        # lm-eval's standard errors of the accuracy rows (an average's assumes independent tasks)
        "stderr": {name: {"dense": d[1], "pruned": p[1]} for name, (d, p) in accuracy.items()},
        "speed_setup": speed.get("setup") if speed else None,
    }


def _fmt(name: str, x, se: float | None = None) -> str:
    if x is None:
        return "—"
    if "accuracy" in name or name.startswith("  "):
        return f"{100 * x:.1f}%" + (f" ± {100 * se:.1f}" if se is not None else "")
    if "parameters" in name:
        return f"{x / 1e6:.1f}M"
    return f"{x:,.1f}" if isinstance(x, float) else f"{x:,}"


def _ratio(name: str, d, p) -> str:
    if d in (None, 0) or p is None:
        return ""
    if "accuracy" in name or name.startswith("  "):
        return f"{100 * (p - d):+.1f} pts"
    return f"x{p / d:.2f}"


def render(summary: dict) -> str:
    """A Markdown table that fits one terminal screen."""
    head = (f"**{summary['method']}** at target sparsity {summary['target_sparsity']:.0%} "
            f"(achieved {summary['achieved_sparsity']:.1%} of decoder-block parameters removed)")
    lines = [head, "", "| | dense | pruned | change |", "|---|---:|---:|---:|"]
    stderr = summary.get("stderr", {})
    for name, v in summary["rows"].items():
        se = stderr.get(name, {})
        lines.append(f"| {name} | {_fmt(name, v['dense'], se.get('dense'))} | {_fmt(name, v['pruned'], se.get('pruned'))} | "
                     f"{_ratio(name, v['dense'], v['pruned'])} |")
    if summary.get("speed_setup"):
        s = summary["speed_setup"]
        lines += ["", f"Speed: batch 1, {s['prompt_len']}-token prompt, {s['new_tokens']} greedy steps, "
                      f"median of {s['repeats']} interleaved runs on {s['device']}."]
    return "\n".join(lines) + "\n"
