"""Serve fang checkpoints with llama.cpp: export each as GGUF, check it against transformers, time it.

Needs llama-cpp-python (not a fang dependency: it builds llama.cpp from source), e.g.

    python -m venv /tmp/llenv --system-site-packages && /tmp/llenv/bin/pip install llama-cpp-python
    /tmp/llenv/bin/python studies/gguf/llama_cpp_check.py --model artifacts/model --model artifacts/pruned

For every model: `fang export --gguf` (kept in --out), then
- agreement: llama.cpp's logits at every position of a few prompts against transformers' (fang's
  loader) on the same token ids: max |difference| and top-1 agreement; the tokenizations compared;
- speed: prompt processing (one batch of --prompt-len tokens) and generation (--new-tokens
  single-token steps after it) in tokens/s, the models interleaved in --repeats rounds, median
  reported, with the 1-minute load average read before every measurement, the CPU other processes
  took meanwhile and this process's CPU milliseconds per token;
- with --ffn-multiple 32, also a timing-only copy of each pruned model whose FFN widths are rounded
  down to a multiple of 32 (llama.cpp's fast GEMM and quant blocks need such widths).
Writes report.json and report.md in --out.

On a CPU that reports AMX (this machine's Xeon does), llama.cpp built with GGML_NATIVE=ON compiles
its AMX kernels, and every quantized model (Q8_0, Q4_1: the stock SmolLM2 GGUF too, so not the
export) crashed with a segfault in ggml_backend_amx_mul_mat on the first decode. Building without
them works: CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" pip install llama-cpp-python.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np

PROMPTS = [
    "The history of the city begins in the twelfth century, when",
    "Photosynthesis is the process by which green plants",
    "In 1969, the Apollo 11 mission landed two astronauts on the Moon. The",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three largest countries by area are Russia, Canada and",
]


QUANT_TYPES = {"q8_0": 7, "q4_0": 2}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def quantize(src: Path, dst: Path, kind: str, threads: int) -> None:
    """llama.cpp's own quantizer (what `llama-quantize` runs): a matrix whose rows do not split into its blocks
    (32 values for q8_0/q4_0) stays F16 -- with pruning that is any FFN width that is not a multiple of 32."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[kind]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {kind}) failed with {rc}")


def tensor_types(path: Path) -> dict[str, int]:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def ffn_aligned_copy(model_dir: str, out_dir: Path, multiple: int) -> str:
    """A copy of a pruned checkpoint whose every FFN width is rounded DOWN to `multiple` by dropping its last
    kept neurons: for timing only (its quality is not the method's), to show what aligned widths would run at."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = Path(model_dir), out_dir / f"{Path(model_dir).resolve().name}-ffn{multiple}"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "structure.json"))
    state = load_file(str(src / "model.safetensors"))
    structure = json.loads((src / "structure.json").read_text())
    config = json.loads((dst / "config.json").read_text())
    for i, layer in enumerate(structure["layers"]):
        keep = max(multiple, layer["intermediate_size"] // multiple * multiple)
        prefix = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            state[f"{prefix}{name}.weight"] = state[f"{prefix}{name}.weight"][:keep].contiguous()
        state[f"{prefix}down_proj.weight"] = state[f"{prefix}down_proj.weight"][:, :keep].contiguous()
        layer["intermediate_size"] = keep
        layer.pop("kept_neurons", None)
        if isinstance(config.get("pruned_layers"), list):
            config["pruned_layers"][i]["intermediate_size"] = keep
    structure.pop("weights_sha256", None)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "structure.json").write_text(json.dumps(structure, indent=2))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return str(dst)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds all processes spent busy, CPU seconds this process spent), both since boot / start.

    Their difference over a measurement is what other processes took from the two cores meanwhile;
    unlike the load average it does not count this benchmark's own threads.
    """
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    own = resource.getrusage(resource.RUSAGE_SELF)  # microsecond resolution, all threads
    return (total - idle) / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def agreement(model_dir: str, gguf_path: Path, threads: int, greedy_tokens: int, kv_f32: bool) -> dict:
    import llama_cpp
    import torch

    from fang.model.shrink import load_any

    model, tokenizer = load_any(model_dir)
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          logits_all=True, verbose=False, type_k=0 if kv_f32 else None, type_v=0 if kv_f32 else None)
    rows, same_tokens = [], True
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        same_tokens &= llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids
        # greedy continuation by transformers, then both score the whole sequence
        with torch.no_grad():
            full = model.generate(torch.tensor([ids]), max_new_tokens=greedy_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[0].tolist()
        llm.reset()
        llm.eval(full)
        got = np.asarray(llm.scores[: len(full)], dtype=np.float64)
        want = hf_logits(model, full)
        diff = np.abs(got - want)
        rows.append({
            "prompt_tokens": len(ids), "tokens": len(full),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "logit_scale": float(np.abs(want).max()),
            "top1_agree": float((got.argmax(-1) == want.argmax(-1)).mean()),
            # the greedy continuation as llama.cpp would pick it, token by token, from the same prefix
            "greedy_agree": float((got[len(ids) - 1 : -1].argmax(-1) == np.asarray(full[len(ids):])).mean()),
        })
    llm.close()
    return {
        "tokenization_identical": bool(same_tokens),
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "mean_abs_diff": float(np.mean([r["mean_abs_diff"] for r in rows])),
        "top1_agree": float(np.mean([r["top1_agree"] for r in rows])),
        "greedy_agree": float(np.mean([r["greedy_agree"] for r in rows])),
        "positions": sum(r["tokens"] for r in rows),
        "prompts": rows,
    }


def wait_idle(limit_s: float, window_s: float = 15.0, max_cores: float = 0.15) -> float:
    """Wait (up to limit_s) until other processes use under max_cores over a window; returns their last use."""
    deadline = time.monotonic() + limit_s
    while True:
        busy0, own0 = busy_seconds()
        time.sleep(window_s)
        busy1, own1 = busy_seconds()
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / window_s
        if others < max_cores or time.monotonic() > deadline:
            return others


def timing(paths: dict[str, Path], threads: int, prompt_len: int, new_tokens: int, repeats: int, seed: int) -> dict:
    import llama_cpp

    llms = {name: llama_cpp.Llama(str(p), n_ctx=prompt_len + new_tokens + 8, n_batch=prompt_len, n_ubatch=prompt_len,
                                  n_threads=threads, n_threads_batch=threads, verbose=False)
            for name, p in paths.items()}
    rng = np.random.default_rng(seed)
    results = {name: {"pp": [], "tg": [], "load": [], "others": [], "pp_cpu": [], "tg_cpu": []} for name in paths}

    def one(name: str, record: bool) -> None:
        llm = llms[name]
        vocab = llm.n_vocab()
        prompt = rng.integers(100, vocab - 100, prompt_len).tolist()  # content does not change the cost
        steps = rng.integers(100, vocab - 100, new_tokens).tolist()
        load = loadavg()
        busy0, own0 = busy_seconds()
        w0 = time.perf_counter()
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        pp = time.perf_counter() - t0
        _, own_pp = busy_seconds()
        t0 = time.perf_counter()
        for tok in steps:
            llm.eval([tok])
        tg = time.perf_counter() - t0
        busy1, own1 = busy_seconds()
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (time.perf_counter() - w0)  # cores busy elsewhere
        if record:
            results[name]["others"].append(round(others, 2))
            # this process's CPU time per token: less sensitive than wall time to other processes
            # (threads that spin while waiting for a descheduled peer still inflate it)
            results[name]["pp_cpu"].append((own_pp - own0) / prompt_len * 1e3)
            results[name]["tg_cpu"].append((own1 - own_pp) / new_tokens * 1e3)
            results[name]["pp"].append(prompt_len / pp)
            results[name]["tg"].append(new_tokens / tg)
            results[name]["load"].append(load)

    for name in paths:  # warm-up: page the weights in, size the buffers
        one(name, record=False)
    for r in range(repeats):
        order = list(paths) if r % 2 == 0 else list(paths)[::-1]
        for name in order:
            one(name, record=True)
    for llm in llms.values():
        llm.close()
    return {
        name: {
            "pp_tok_s": statistics.median(v["pp"]), "tg_tok_s": statistics.median(v["tg"]),
            "pp_all": [round(x, 1) for x in v["pp"]], "tg_all": [round(x, 2) for x in v["tg"]],
            "load_1min": v["load"], "other_cores": v["others"],
            "pp_cpu_ms_per_tok": statistics.median(v["pp_cpu"]), "tg_cpu_ms_per_tok": statistics.median(v["tg_cpu"]),
        }
        for name, v in results.items()
    }


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"llama.cpp (llama-cpp-python {report['llama_cpp_version']}), {s['quantize'] or s['dtype']} GGUF, {s['threads']} threads, "
        f"prompt {s['prompt_len']} tokens, {s['new_tokens']} generated, median of {s['repeats']} interleaved rounds; "
        f"1-minute load average {report['load_min']:.2f}-{report['load_max']:.2f} during the timings (this benchmark's "
        f"threads included); other processes used {report['others_mean']:.2f} cores on average, "
        f"{report['others_max']:.2f} at most.",
        "",
        "| model | GGUF MiB | params | prompt tok/s | gen tok/s | prompt CPU ms/tok | gen CPU ms/tok "
        "| max abs logit diff | top-1 agree | greedy agree | same tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = next(iter(report["models"].values()))
    for name, m in report["models"].items():
        t = m["timing"]
        a = m.get("agreement") or {"max_abs_diff": float("nan"), "top1_agree": float("nan"),
                                   "greedy_agree": float("nan"), "tokenization_identical": None}
        rel = "" if m is base else (f" ({t['pp_tok_s'] / base['timing']['pp_tok_s']:.2f}x)",
                                     f" ({t['tg_tok_s'] / base['timing']['tg_tok_s']:.2f}x)")
        pp_rel, tg_rel = rel if rel else ("", "")
        lines.append(
            f"| {name} | {m['bytes'] / 2**20:.0f} | {m['parameters'] / 1e6:.1f}M | {t['pp_tok_s']:.0f}{pp_rel} | "
            f"{t['tg_tok_s']:.1f}{tg_rel} | {t['pp_cpu_ms_per_tok']:.2f} | {t['tg_cpu_ms_per_tok']:.2f} | {a['max_abs_diff']:.2e} | {a['top1_agree']:.3f} | {a['greedy_agree']:.3f} | "
            f"{ {True: 'yes', False: 'no', None: '-'}[a['tokenization_identical']]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="checkpoint directory (the first is the baseline)")
    parser.add_argument("--out", default="artifacts/gguf")
    parser.add_argument("--report", default="report", help="name of report.json / report.md in --out")
    parser.add_argument("--dtype", default="f16", choices=["f16", "f32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--greedy-tokens", type=int, default=16)
    parser.add_argument("--quantize", choices=sorted(QUANT_TYPES), help="also quantize the export with llama.cpp "
                        "and check/time the quantized file instead")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--ffn-multiple", type=int, default=0, metavar="N",
                        help="also time a copy of each pruned model (with structure.json) whose FFN widths are rounded "
                             "down to a multiple of N (timing only: neurons dropped without regard to quality)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before timing, wait up to this long for the other processes to leave the CPU idle")
    args = parser.parse_args()

    import llama_cpp

    from fang.model.export_gguf import export_gguf

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models, paths = {}, {}
    model_dirs = list(args.model)
    if args.ffn_multiple:
        model_dirs += [ffn_aligned_copy(d, out, args.ffn_multiple) for d in args.model if (Path(d) / "structure.json").exists()]
    for model_dir in model_dirs:
        name = Path(model_dir).resolve().name
        path = out / f"{name}.{args.dtype}.gguf"
        t0 = time.perf_counter()
        info = export_gguf(model_dir, path, dtype=args.dtype)
        print(f"exported {model_dir} -> {path} in {time.perf_counter() - t0:.1f} s ({info['bytes'] / 2**20:.0f} MiB)", flush=True)
        if args.quantize:
            qpath = out / f"{name}.{args.quantize}.gguf"
            quantize(path, qpath, args.quantize, args.threads)
            path = qpath
        paths[name] = path
        models[name] = {"dir": model_dir, "gguf": str(path), "bytes": path.stat().st_size,
                        "parameters": info["parameters"], "layers": info["layers"], "tensor_types": tensor_types(path)}
        print(f"{name}: {path.name}, tensor types {models[name]['tensor_types']}", flush=True)
        if not args.skip_agreement and model_dir in args.model:
            # an f32 file is checked with an f32 KV cache (only summation order differs); otherwise llama.cpp's default
            kv_f32 = args.dtype == "f32" and not args.quantize
            models[name]["agreement"] = agreement(model_dir, path, args.threads, args.greedy_tokens, kv_f32)
            models[name]["agreement"]["kv_cache"] = "f32" if kv_f32 else "f16"
            a = models[name]["agreement"]
            print(f"{name}: max abs logit diff {a['max_abs_diff']:.3e}, top-1 {a['top1_agree']:.3f}, "
                  f"greedy {a['greedy_agree']:.3f}, same tokens {a['tokenization_identical']}", flush=True)
    if args.wait_idle:
        print(f"other processes use {wait_idle(args.wait_idle):.2f} cores; timing", flush=True)
    times = timing(paths, args.threads, args.prompt_len, args.new_tokens, args.repeats, seed=0)
    for name, t in times.items():
        models[name]["timing"] = t
        print(f"{name}: pp {t['pp_tok_s']:.1f} tok/s {t['pp_all']}, tg {t['tg_tok_s']:.2f} tok/s {t['tg_all']}, "
              f"CPU ms/token pp {t['pp_cpu_ms_per_tok']:.2f} tg {t['tg_cpu_ms_per_tok']:.2f}, "
              f"load {t['load_1min']}, other processes' cores {t['other_cores']}", flush=True)
    loads = [x for t in times.values() for x in t["load_1min"]]
    others = [x for t in times.values() for x in t["other_cores"]]
    report = {
        "llama_cpp_version": llama_cpp.__version__,
        "settings": {k: getattr(args, k) for k in ("dtype", "quantize", "threads", "prompt_len", "new_tokens", "repeats")},
        "load_min": min(loads), "load_max": max(loads), "others_max": max(others), "others_mean": float(np.mean(others)),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cpu": os.cpu_count(),
        "models": models,
    }
    (out / f"{args.report}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{args.report}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
