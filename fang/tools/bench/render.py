"""The benchmark as Markdown (artifacts/bench/bench.md) and as the fragment of docs/results.md."""

from __future__ import annotations

import os

from ...core.markdown import replace_between_markers
from .machine import machine_line

BENCH_FORMAT = 1
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


# ------------------------------------------------------------------------------------------------------------
# rendering


def _gib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f} GiB"


def _mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f} MiB"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "—" if x is None else format(x, fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _targets_table(targets: list[dict]) -> list[str]:
    def status(t: dict) -> str:
        missing = t.get("missing") or []
        return f"{t['status']} (missing: {', '.join(missing)})" if t["status"] == "no data" and missing else t["status"]

    rows = [[t["target"], _num(t["seconds"], ".1f"), f"{_num(t['reference_seconds'], '.1f')} ({t['reference'].split(' (')[0]})",
             _num(t["ratio"], ".2f"), f"≤ {t['limit']:g}", status(t),
             "—" if t.get("peak_rss_mib") is None else f"{t['peak_rss_mib']:,}", _num(t.get("load5"), ".1f")]
            for t in targets]
    return _table(["target", "stage s", "reference s", "ratio", "limit", "status", "peak RSS MiB", "load"], rows)


TARGETS_LEGEND = ("peak RSS: the largest of the target's stages; load: the machine's 5-minute load average when "
                  "the stage ended (— for runs logged before it was recorded); a load above the core count means "
                  "the wall time shared the cores and its ratio is inflated.")


def _inference_rows(inf: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "block params", "sparsity", "checkpoint"]
    for b in inf["batch_sizes"]:
        header += [f"prefill tok/s b={b}", f"decode tok/s b={b}"]
    rows = []
    for m in inf["models"]:
        row = [m["name"], f"{m['block_params']:,}", f"{m['block_sparsity']:.1%}", _mib(m["checkpoint_bytes"])]
        for r in m["runs"]:
            if m["kind"] == "dense":
                row += [f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.1f}"]
            else:
                row += [f"{r['prefill_tok_s']:.1f} ({r['prefill_speedup']:.2f}×)",
                        f"{r['decode_tok_s']:.1f} ({r['decode_speedup']:.2f}×)"]
        rows.append(row)
    return header, rows


def _memory_lines(est: dict) -> list[str]:
    m = est["model"]
    disk, ram, gpu = est["disk"], est["ram"], est["gpu"]
    rows = [
        ["disk: capture store, uncompressed", _gib(disk["uncompressed_bytes"]), disk["formula"]],
        ["disk: capture store, compressed", _gib(disk["compressed_bytes"]),
         f"uncompressed × {_num(disk['compression_ratio'], '.3f')} (ratio measured on {disk['compression_measured_on']})"],
        ["RAM: one block's hidden states", _gib(ram["bytes"]), ram["formula"]],
        ["GPU: weights fp16", _gib(gpu["weights_bytes"]), f"{gpu['params']:,} params · 2 B; params = {gpu['params_formula']}"],
        ["GPU: one block's activations", _gib(gpu["activations_bytes"]), gpu["activations_formula"]],
        ["GPU: weights + one block", _gib(gpu["total_bytes"]), "weights + activations (fused SDPA attention: no score matrix)"],
        ["GPU: + eager attention scores", _gib(gpu["total_bytes_eager"]), gpu["attention_scores_formula"]],
    ]
    return [f"Estimate for {m['name']} ({m['n_layers']} layers, d={m['hidden_size']}, FFN {m['intermediate_size']}, "
            f"{m['n_heads']} heads) at {est['n_samples']} × {est['seq_len']} calibration tokens, batch {est['batch_size']}:",
            "", *_table(["what", "bytes", "formula"], rows)]


def _profile_lines(prof: dict) -> list[str]:
    out = ["## Profile", "",
           f"cProfile of the stages' own functions on {prof['sequences']} calibration sequences "
           "(functions by self time; cProfile adds overhead, so compare shares, not totals).", ""]
    for name, p in prof["runs"].items():
        rows = [[r["function"], f"{r['calls']:,}", f"{r['self_seconds']:.2f}",
                 f"{100 * r['self_seconds'] / p['seconds']:.0f}%"] for r in p["top"]]
        out += [f"**{name}**: {p['seconds']:.1f} s wall", "", *_table(["function", "calls", "self s", "share"], rows), ""]
    return out


def _kept(result: dict, part: str) -> str:
    """'' for a part measured in this run; otherwise when it was measured (bench --keep)."""
    when = result.get("measured", {}).get(part)
    return "" if when in (None, result["time"]) else f" (measured {when}, kept from an earlier run)"


def render_markdown(result: dict) -> str:
    """The full benchmark as Markdown tables (artifacts/bench/bench.md)."""
    out = ["# fang benchmark", "", f"Measured {result['time']} on {machine_line(result['machine'])}.", ""]
    pipe = result.get("pipeline")
    if pipe is not None:
        out += ["## Pipeline cost" + _kept(result, "pipeline"), ""]
        floor = pipe.get("floor")
        if floor:
            f, fb = floor["forward"], floor["forward_backward"]
            fb_text = (f"{fb['seconds_full']:.1f} s (batch {fb['batch_size']}, {fb['backward']})" if fb
                       else f"not measured ({floor.get('forward_backward_skipped', 'no data')})")
            out += [f"Compute floor over the {floor['calib_tokens']:,} calibration tokens ({floor['calib_sequences']} × "
                    f"{floor['seq_len']}), measured on {floor['tokens_measured']:,} tokens and scaled per token: "
                    f"forward {f['seconds_full']:.1f} s (batch {f['batch_size']}), forward+backward {fb_text}.", ""]
        if pipe["stages"]:
            fwd = floor["forward"]["seconds_full"] if floor else None
            rows = [[e["label"], f"{e['seconds']:.1f}", _num(e["seconds"] / fwd if fwd else None, ".2f"),
                     "—" if e["peak_rss_mib"] is None else f"{e['peak_rss_mib']:,}", e["time"] or "—"]
                    for e in pipe["stages"]]
            out += ["Stage timings (latest run of each stage, from artifacts/timings.jsonl; they may come from "
                    "another machine or calibration set than this bench run):", "",
                    *_table(["stage", "seconds", "× forward", "peak RSS MiB", "when"], rows), ""]
        else:
            out += ["No stage timings found (artifacts/timings.jsonl).", ""]
        out += ["Targets:", "", *_targets_table(pipe["targets"]), "", TARGETS_LEGEND, ""]
    mem = result.get("memory")
    if mem is not None:
        fp = mem["footprint"]
        out += ["## Memory" + _kept(result, "memory"), "",
                f"Capture store {fp['path']} ({fp['n_samples']} × {fp['seq_len']} tokens, {fp['model']['n_layers']} layers): "
                f"{fp['bytes_per_token_layer']:,} bytes per token and layer; {_mib(fp['logical_bytes'])} logical, "
                f"{_mib(fp['disk_bytes'])} on disk (compression ratio {_num(fp['compression_ratio'], '.3f')}).", ""]
        rows = [[e["name"], "×".join(map(str, e["shape"])), e["dtype"], e["scales"], str(e.get("width_dim") or "—"),
                 _mib(e["logical_bytes"]), _mib(e["disk_bytes"])] for e in fp["arrays"]]
        out += [*_table(["array", "shape", "dtype", "scales with", "width", "logical", "disk"], rows), ""]
        if mem.get("stage_rss"):
            rows = [[s["label"], f"{s['peak_rss_mib']:,}"] for s in mem["stage_rss"]]
            out += [f"Peak RSS of the stages that stream the store (the store is {_mib(fp['logical_bytes'])}; "
                    f"one block's hidden states {_mib(mem['one_block_bytes'])}):", "",
                    *_table(["stage", "peak RSS MiB"], rows), ""]
        out += [*_memory_lines(mem["estimate"]), ""]
    inf = result.get("inference")
    if inf is not None:
        header, rows = _inference_rows(inf)
        out += ["## Inference" + _kept(result, "inference"), "",
                f"Prefill of {inf['prompt_len']} tokens, greedy decode of {inf['new_tokens']} tokens with the KV cache; "
                f"{inf['statistic']} of {inf['repeats']} interleaved rounds after a warm-up; speedup = pruned tok/s ÷ dense tok/s.",
                "", *_table(header, rows), ""]
    if result.get("profile"):
        out += _profile_lines(result["profile"])
    return "\n".join(out).rstrip() + "\n"


def render_fragment(result: dict) -> str:
    """The benchmark section of docs/results.md (pasted between the bench markers by `update_readme`)."""
    out = [f"<!-- generated by `fang bench` on {result['time']}; rerun it instead of editing -->",
           f"Measured on {machine_line(result['machine'])}.", ""]
    pipe = result.get("pipeline")
    if pipe is not None:
        floor = pipe.get("floor")
        if floor:
            out += [f"**Pipeline cost**{_kept(result, 'pipeline')} against the compute floor (forward {floor['forward']['seconds_full']:.1f} s, "
                    f"forward+backward {_floor_seconds(floor, 'forward_backward')} over "
                    f"{floor['calib_tokens']:,} calibration tokens):", ""]
        else:
            out += [f"**Pipeline cost**{_kept(result, 'pipeline')}:", ""]
        out += [*_targets_table(pipe["targets"]), "", TARGETS_LEGEND, ""]
    mem = result.get("memory")
    if mem is not None:
        est = mem["estimate"]
        out += [f"**Memory**{_kept(result, 'memory')} (capture store: {mem['footprint']['bytes_per_token_layer']:,} bytes per token and layer "
                f"on the default model). {_memory_lines(est)[0]}", "", *_memory_lines(est)[2:], ""]
    inf = result.get("inference")
    if inf is not None:
        header, rows = _inference_rows(inf)
        out += [f"**Inference**{_kept(result, 'inference')} (prefill {inf['prompt_len']} tokens, greedy decode {inf['new_tokens']}, "
                f"{inf['statistic']} of {inf['repeats']}; speedup vs dense in parentheses):", "", *_table(header, rows), ""]
    return "\n".join(out).rstrip() + "\n"


def update_readme(readme_path: str | os.PathLike, fragment: str) -> None:
    """Replace the text between the bench markers of a page (docs/results.md) with `fragment` (see `fang.core.markdown`)."""
    replace_between_markers(readme_path, fragment, README_START, README_END)


def _floor_seconds(floor: dict, name: str) -> str:
    """'12.3 s', or 'not measured' for a floor a streamed bench skipped (forward+backward)."""
    entry = floor.get(name)
    return "not measured" if entry is None else f"{entry['seconds_full']:.1f} s"
