"""What `prune.align` buys in speed, from shapes alone: random-weight LLaMA models with the dense model's config
and a pruned model's per-block widths, unaligned against aligned, timed at prompt processing.

The weights are random (speed depends on shapes only), the widths are a real prune report's
(`<method>-<sparsity>.prune.json`: kept FFN neurons and KV heads per block) and their aligned versions are
what planning would make of them (`fang.methods.plan.align_widths` on the same unaligned widths). Every
variant is built by shrinking the same random dense model with `fang.model.shrink` (the layout a pruned
checkpoint loads into), and timed with transformers on the CPU: one prompt of `prompt_len` tokens in one
forward (batch 1, logits of the last position only, as `generate`'s prefill), the variants interleaved in
`repeats` rounds, median reported, with this process's CPU time per token (steadier than wall clock on
a shared machine: it leaves out the time other jobs held the core) and the 1-minute load average read
before every measurement.

llama.cpp is timed only by studies/gguf/llama_cpp_check.py (`--ffn-multiple`), which needs
llama-cpp-python; this module records whether the binding was importable.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ...core.atomic import read_json
from ...core.errors import require
from ...methods.plan import align_widths
from ...model.modeling import count_block_params, decoder_layers
from ...model.shrink import shrink_attention, shrink_mlp


Heads = list[tuple[int, int]]  # (KV heads, query heads) kept per block


def report_widths(report: dict) -> tuple[list[int], Heads]:
    """(kept FFN neurons, (kept KV heads, kept query heads)) per block of a prune report
    (`PruneReport.as_dict`); a report of an aligned prune gives its unaligned widths (`ffn_unaligned`)."""
    layers = report.get("layers") or []
    require(bool(layers), "the prune report has no per-block layers (a prune that removed nothing?)")
    ffn = [int(e.get("ffn_unaligned", e["ffn"])) for e in layers]
    heads = [(int(e["kv_heads"]), int(e["heads"])) for e in layers]
    return ffn, heads


def random_dense(config, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A LLaMA-family model of `config` with random weights (N(0, 0.02)), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return model


def shaped(dense: nn.Module, ffn: list[int], heads: Heads) -> nn.Module:
    """A copy of `dense` cut to `ffn[l]` FFN neurons and `heads[l]` = (KV heads, query heads) per block (the
    first ones: which units are kept does not change the shapes)."""
    model = copy.deepcopy(dense)
    layers = decoder_layers(model)
    require(len(ffn) == len(layers) == len(heads),
            f"{len(ffn)} FFN widths and {len(heads)} head counts for a model of {len(layers)} blocks")
    n_kv = model.config.num_key_value_heads
    with torch.no_grad():
        for layer, w, (kv, q) in zip(layers, ffn, heads):
            n = layer.mlp.down_proj.in_features
            require(1 <= w <= n, f"cannot keep {w} of {n} FFN neurons")
            require(1 <= kv <= n_kv and q % kv == 0, f"cannot keep {q} query heads on {kv} of {n_kv} KV heads")
            if w < n:
                shrink_mlp(layer.mlp, torch.arange(w))
            if q < model.config.num_attention_heads:
                shrink_attention(layer.self_attn, torch.arange(kv), torch.arange(q // kv))
    return model


def _load1() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


@torch.no_grad()
def time_prefill(model: nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one prefill forward of `ids` [1, P]."""
    w0, c0 = time.perf_counter(), time.process_time()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - w0, time.process_time() - c0


def variants(ffn: list[int], heads: Heads, dense_ffn: list[int], dense_heads: tuple[int, int],
             aligns: list[int]) -> dict[str, tuple[list[int], Heads]]:
    """name -> (FFN widths, heads): the dense model, the report's widths, and those widths aligned as planning
    would align them (heads are not rounded)."""
    out = {"dense": (list(dense_ffn), [dense_heads] * len(dense_ffn)), "pruned": (list(ffn), list(heads))}
    for a in aligns:
        out[f"pruned, align {a}"] = (align_widths(ffn, dense_ffn, a), list(heads))
    return out


def measure_align_speed(
    config,
    ffn: list[int],
    heads: Heads,
    aligns: list[int],
    dtypes: list[str],
    prompt_len: int = 128,
    repeats: int = 5,
    threads: int = 1,
    seed: int = 0,
) -> dict:
    """Prompt-processing speed of the dense model, the pruned widths and the aligned widths (see the module)."""
    require(prompt_len > 0 and repeats > 0 and threads > 0, "prompt_len, repeats and threads must be positive")
    require(all(isinstance(a, int) and a >= 1 for a in aligns), f"aligns={aligns}: give integers >= 1")
    torch.set_num_threads(threads)
    dense_ffn = [config.intermediate_size] * config.num_hidden_layers
    shapes = variants(ffn, heads, dense_ffn, (config.num_key_value_heads, config.num_attention_heads), aligns)
    ids = torch.randint(0, config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed + 1))
    results: dict = {"dtypes": {}}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        dense = random_dense(config, dtype, seed)
        models = {name: shaped(dense, w, h) for name, (w, h) in shapes.items()}
        del dense
        for m in models.values():  # untimed: the first calls pay one-off allocations
            time_prefill(m, ids[:, :16])
            time_prefill(m, ids)
        runs: dict[str, list[dict]] = {name: [] for name in models}
        for _ in range(repeats):
            for name, m in models.items():  # interleaved, so a change of load hits every variant alike
                load = _load1()
                wall, cpu = time_prefill(m, ids)
                runs[name].append({"wall_s": wall, "cpu_s": cpu, "load1": load})
        rows = {}
        for name, m in models.items():
            wall = statistics.median(r["wall_s"] for r in runs[name])
            cpu = statistics.median(r["cpu_s"] for r in runs[name])
            rows[name] = {
                "ffn": shapes[name][0], "kv_heads": [h[0] for h in shapes[name][1]],
                "block_params": count_block_params(m),
                "tokens_per_s": prompt_len / wall, "cpu_ms_per_token": 1000 * cpu / prompt_len,
                "runs": runs[name],
            }
        base = rows["dense"]
        for row in rows.values():
            row["speedup_wall"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["speedup_cpu"] = base["cpu_ms_per_token"] / row["cpu_ms_per_token"]
            row["block_params_vs_dense"] = row["block_params"] / base["block_params"]
        results["dtypes"][dtype_name] = rows
        del models
    results.update(prompt_len=prompt_len, repeats=repeats, threads=threads, aligns=aligns,
                   llama_cpp_python=importlib.util.find_spec("llama_cpp") is not None)
    return results


def render_table(result: dict) -> str:
    """Markdown: one row per dtype and variant."""
    lines = [
        "| dtype | model | block params (vs dense) | prompt tok/s (vs dense) | CPU ms/token (speedup) "
        "| load1 during runs |",
        "|---|---|---:|---:|---:|---|",
    ]
    for dtype, rows in result["dtypes"].items():
        for name, r in rows.items():
            loads = [x["load1"] for x in r["runs"] if x["load1"] is not None]
            load = f"{min(loads):.2f}-{max(loads):.2f}" if loads else "n/a"
            lines.append(f"| {dtype} | {name} | {r['block_params']:,} ({r['block_params_vs_dense']:.3f}) | "
                         f"{r['tokens_per_s']:.0f} ({r['speedup_wall']:.2f}x) | "
                         f"{r['cpu_ms_per_token']:.2f} ({r['speedup_cpu']:.2f}x) | {load} |")
    return "\n".join(lines)


def load_inputs(report_path: str | os.PathLike, config_path: str | os.PathLike):
    """(config, FFN widths, heads) from a prune report and a model's config.json (or its folder)."""
    from transformers import AutoConfig

    config_path = Path(config_path)
    require(config_path.exists(), f"{config_path} does not exist: give the dense model's config.json or folder")
    config = AutoConfig.from_pretrained(config_path.parent if config_path.is_file() else config_path)
    ffn, heads = report_widths(read_json(report_path))
    require(len(ffn) == config.num_hidden_layers,
            f"{report_path} has {len(ffn)} blocks, {config_path} {config.num_hidden_layers}: a report of another model")
    return config, ffn, heads
