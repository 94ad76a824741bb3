"""Cost growth, measured (`fang bench --parts scale`): random-weight LLaMA-shaped models at several widths, depths
and calibration sizes run through the real stages (capture, cluster, taylor, group, allocate, prune with o_fang and
flap), each stage in a fresh forked process for its CPU time and peak RSS; least-squares fits of how each stage
grows, and LLaMA-2-7B / 70B estimates on one H100 from those fits.

How a configuration is measured: a scratch project folder gets a random `LlamaForCausalLM` of the shape
(artifacts/model, with a character tokenizer built in code), random calibration token ids
(artifacts/calib/calib.safetensors) and the project's params.yaml with the measurement's batch sizes. One
server process (`SERVER`, fresh interpreter, imports done once, one thread) then forks a child per
stage, in pipeline order; the child calls the stage's `run()` exactly as `fang <stage>` does and reports the CPU
time (`time.process_time`) and wall time of that call, the 1-minute load average, its RSS before the call and
its peak RSS (`ru_maxrss`). A forked child starts from the server's pages (the imports, ~250 MiB), which is
what a fresh `fang <stage>` holds before its work too; the growth over that baseline is reported beside the peak.

CPU time is the primary figure: on a shared machine wall time includes the time other jobs held the core,
process CPU time (one torch thread) is the single-core work. It is still inflated a little by cache and memory
bandwidth contention under load.

Fits: per stage, CPU seconds = sum_k c_k x_k with x_k counted from the shapes (`features`): FLOPs of the
block forward (matmuls + attention), of the LM head, of Gram/Hessian accumulations (2 T h^2 or 2 T f^2 per
layer), of cubic factorisations (h^3 or f^3 per layer), of k-means, bytes of weights, and a constant. Non-negative least squares
(`nnls`) on the terms the stage is expected to have, minimising relative residuals; 1/c_k is the term's achieved FLOP/s on this core.
Peak RSS growth is fitted the same way on byte counts (weights, hidden states, a batch's activations, Hessians).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ...core.atomic import read_json, write_json
from ...core.errors import FangError, require

SCALE_FORMAT = 1
VOCAB = 4096  # random models' vocabulary (the LM head term is counted apart and extrapolated to the real one)

# name -> hidden, FFN, query heads, KV heads (head_dim = hidden / heads)
SHAPES: dict[str, dict] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 176, "n_heads": 4, "n_kv_heads": 2},
    "tiny-wide": {"hidden_size": 128, "intermediate_size": 352, "n_heads": 4, "n_kv_heads": 2},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "n_heads": 9, "n_kv_heads": 3},
    "smollm2-360m": {"hidden_size": 960, "intermediate_size": 2560, "n_heads": 15, "n_kv_heads": 5},
    "tinyllama-1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "n_heads": 32, "n_kv_heads": 4},
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "n_heads": 32, "n_kv_heads": 32},
    "llama2-70b": {"hidden_size": 8192, "intermediate_size": 28672, "n_heads": 64, "n_kv_heads": 8},
}
# the full models the estimates are for (layers and vocabulary as released)
TARGETS = {
    "LLaMA-2-7B": {"shape": "llama2-7b", "n_layers": 32, "vocab_size": 32000},
    "LLaMA-2-70B": {"shape": "llama2-70b", "n_layers": 80, "vocab_size": 32000},
}
# calibration sizes of the estimates: (name, sequences, tokens per sequence)
CALIBRATIONS = [("paper 128 × 2048", 128, 2048), ("ours 64 × 512", 64, 512)]

# the measurement plans: (shape, layers, sequences, sequence length); widths at 2 layers, then depth and tokens at
# the 360M width, then two crossed points
PLANS: dict[str, list[tuple[str, int, int, int]]] = {
    "default": [
        ("smollm2-135m", 2, 8, 128), ("smollm2-360m", 2, 8, 128), ("tinyllama-1.1b", 2, 8, 128), ("llama2-7b", 2, 8, 128),
        ("smollm2-360m", 4, 8, 128), ("smollm2-360m", 8, 8, 128),
        ("smollm2-360m", 2, 24, 128), ("smollm2-360m", 2, 8, 512),
        ("smollm2-135m", 6, 16, 256), ("tinyllama-1.1b", 3, 16, 256),
        # towards the real calibration sizes (ours is 64 × 512) where a 2-layer model keeps it cheap
        ("smollm2-135m", 2, 64, 512), ("smollm2-360m", 2, 32, 512), ("tinyllama-1.1b", 2, 16, 512),
    ],
    "tiny": [("tiny", 2, 4, 32), ("tiny-wide", 2, 4, 32)],
}
STAGES = ("capture", "cluster", "taylor", "group", "allocate", "prune:o_fang", "prune:flap")

# H100 SXM5 dense peaks (NVIDIA H100 datasheet, without sparsity): bf16 tensor cores 989.4 TFLOP/s, fp32 on CUDA
# cores 66.9 TFLOP/s (PyTorch runs float32 matmuls in full fp32 unless TF32 is allowed, which it is not by default)
H100 = {"name": "H100 SXM5 80 GB", "bf16_flops": 989.4e12, "fp32_flops": 66.9e12, "hbm_bytes_s": 3.35e12,
        "memory_bytes": 80e9}
# efficiency: the share of peak the stages' FLOPs reach. 0.4 is what large dense transformer training reaches on
# H100s (Meta's Llama 3 report: 38-43% BF16 model FLOPs utilisation); our stages are the same GEMM shapes at
# 8 x 2048 tokens per batch, plus float32 statistics and Python per block, so 0.4 is the optimistic end and 0.1 is
# given beside it as a pessimistic one
EFFICIENCIES = (0.4, 0.1)
PAPER_7B_SECONDS = 3600.0  # the FANG paper: "< 1 h for 7B" on one GPU
TARGET_SECONDS = 900.0  # ours: < 15 min

# ------------------------------------------------------------------------------------------------------------
# shapes and features


def shape_dims(shape: dict, n_layers: int, n_seqs: int, seq_len: int, vocab: int = VOCAB, tied: bool = True) -> dict:
    """Every dimension the features use, for one configuration."""
    h, f, nh, nkv = shape["hidden_size"], shape["intermediate_size"], shape["n_heads"], shape["n_kv_heads"]
    require(h % nh == 0 and nh % nkv == 0, f"shape {shape}: hidden must split into heads, heads into KV groups")
    hd = h // nh
    q, kv = nh * hd, nkv * hd
    block_params = h * (q + 2 * kv) + q * h + 3 * h * f
    return {"n_layers": n_layers, "n_seqs": n_seqs, "seq_len": seq_len, "tokens": n_seqs * seq_len,
            "hidden_size": h, "intermediate_size": f, "n_heads": nh, "n_kv_heads": nkv, "head_dim": hd,
            "vocab_size": vocab, "tie_word_embeddings": tied, "block_params": block_params}


def features(d: dict, batch: int = 8, kmeans: tuple[int, int, int] = (64, 7, 25)) -> dict[str, float]:
    """The terms a stage's cost is fitted on, counted from the shapes (FLOPs, bytes, elements).

    fwd_flops: block forward, 2 · n · T · block_params (matmuls) + 2 · n · T · L · q (causal attention scores and
    values: L/2 keys on average, 2 matmuls, 2 FLOPs per multiply-add); head_flops: 2 · T · h · vocab;
    gram_h_flops / gram_f_flops: 2 · n · T · h² and 2 · n · T · f² (accumulating an h×h or f×f Gram matrix per
    layer: capture's PCA covariance of the MLP inputs is h×h, the down_proj Hessian of OBC/O-FANG f×f);
    cubic_h_flops / cubic_f_flops: n · h³ and n · f³ (an eigendecomposition, Cholesky factor or inverse per layer);
    kmeans_flops: 2 · n · T · pca_dim · k · niter (Lloyd iterations on the projected tokens; `kmeans`);
    weight_bytes: float32 weights of the blocks, the embeddings and an untied LM head; layer_tokens: n · T (per-token work that does
    not grow with width: k-means on the fixed PCA width); layers: n; const: 1.
    Memory terms: hidden_bytes T · h · 4 (one block's hidden states for every token), act_bytes one batch's
    activations in one block (b · L · (4h + q + 2kv + 3f) · 4), hessian_bytes (h² + f²) · 4.
    """
    n, T, L, h, f = d["n_layers"], d["tokens"], d["seq_len"], d["hidden_size"], d["intermediate_size"]
    q, kv = d["n_heads"] * d["head_dim"], d["n_kv_heads"] * d["head_dim"]
    b = min(batch, d["n_seqs"])
    return {
        "fwd_flops": 2.0 * n * T * d["block_params"] + 2.0 * n * T * L * q,
        "head_flops": 2.0 * T * h * d["vocab_size"],
        "gram_h_flops": 2.0 * n * T * h * h,
        "gram_f_flops": 2.0 * n * T * f * f,
        "cubic_h_flops": float(n) * h ** 3,
        "cubic_f_flops": float(n) * f ** 3,
        "kmeans_flops": 2.0 * n * T * kmeans[0] * kmeans[1] * kmeans[2],
        "weight_bytes": 4.0 * (n * d["block_params"] + d["vocab_size"] * h * (1 if d.get("tie_word_embeddings", True) else 2)),
        "layer_tokens": float(n * T),
        "layers": float(n),
        "const": 1.0,
        "hidden_bytes": 4.0 * T * h,
        "act_bytes": 4.0 * b * L * (4 * h + q + 2 * kv + 3 * f),
        "hessian_bytes": 4.0 * (h * h + f * f),
    }


# the terms each stage's CPU time is fitted on (what the stage computes), and its peak RSS growth
CPU_TERMS: dict[str, tuple[str, ...]] = {
    "capture": ("fwd_flops", "gram_h_flops", "cubic_h_flops", "const"),  # the PCA of the h-wide MLP inputs
    "cluster": ("kmeans_flops", "const"),
    "taylor": ("fwd_flops", "head_flops", "const"),
    "group": ("cubic_f_flops", "layers", "const"),  # an assignment of the f neurons per layer
    "allocate": ("layers", "const"),
    # the down_proj (f×f) Hessians dominate; o_proj's h×h one (1/7 of it at f/h = 2.7) is folded into their terms
    "prune:o_fang": ("fwd_flops", "gram_f_flops", "cubic_f_flops", "weight_bytes", "const"),
    "prune:flap": ("fwd_flops", "weight_bytes", "const"),
}
RSS_TERMS = ("weight_bytes", "hidden_bytes", "act_bytes", "hessian_bytes", "const")
# terms that are FLOPs (the rest, bytes and counts, are not moved to a GPU's FLOP rate)
FLOP_TERMS = ("fwd_flops", "head_flops", "gram_h_flops", "gram_f_flops", "cubic_h_flops", "cubic_f_flops", "kmeans_flops")


# ------------------------------------------------------------------------------------------------------------
# fitting


def nnls(X: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares min ||X c - y||, c >= 0 (columns scaled to unit norm first, so FLOP counts of
    1e12 and a constant of 1 are solved together)."""
    import numpy as np
    from scipy.optimize import nnls as _nnls

    A = np.asarray(X, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    require(A.ndim == 2 and A.shape[0] == b.shape[0] and A.shape[0] > 0, f"nnls: {A.shape} rows against {b.shape}")
    norms = np.linalg.norm(A, axis=0)
    norms[norms == 0] = 1.0
    c, _ = _nnls(A / norms, b)
    return (c / norms).tolist()


def fit_terms(rows: list[dict], terms: tuple[str, ...], key: str) -> dict:
    """Fit rows[i][key] ≈ sum_k c_k rows[i]['features'][k] over `terms`, minimising the relative residuals:
    coefficients, per-row fitted values and relative residuals, their root mean square and largest."""
    usable = [r for r in rows if r.get(key) is not None and r[key] > 0]  # an RSS growth can be 0: nothing to fit
    require(len(usable) >= 1, f"no positive measurement of {key} to fit")
    X = [[r["features"][t] for t in terms] for r in usable]
    y = [float(r[key]) for r in usable]
    # relative residuals are minimised (each row divided by its measurement): the configurations span three
    # orders of magnitude, and plain least squares would fit the largest and leave the small ones 100% off
    coef = nnls([[x / v for x in xs] for xs, v in zip(X, y)], [1.0] * len(y))
    fitted = [sum(c * x for c, x in zip(coef, xs)) for xs in X]
    rel = [(f - v) / v if v else 0.0 for f, v in zip(fitted, y)]
    return {
        "terms": list(terms),
        "coefficients": dict(zip(terms, coef)),
        "points": [{"config": r["config"], "measured": v, "fitted": f, "relative_residual": e}
                   for r, v, f, e in zip(usable, y, fitted, rel)],
        "rms_relative_residual": math.sqrt(sum(e * e for e in rel) / len(rel)),
        "max_abs_relative_residual": max(abs(e) for e in rel),
        "n_points": len(usable),
        "n_left_out": len(rows) - len(usable),
    }


def predict(fit: dict, feats: dict[str, float]) -> float:
    return sum(c * feats[t] for t, c in fit["coefficients"].items())


# ------------------------------------------------------------------------------------------------------------
# estimates


def gpu_seconds(fit: dict, feats: dict[str, float], cpu_gemm_flops_s: float, peak_flops_s: float,
                efficiency: float) -> dict:
    """One stage on a GPU from its CPU fit: every FLOP term's fitted CPU seconds, times this core's GEMM rate, is
    the term's work in GEMM-equivalent FLOPs (a term the CPU ran at a quarter of its GEMM rate counts four times
    its FLOPs); the GPU runs that at `peak_flops_s · efficiency`. Terms that are not FLOPs (the constant, bytes
    of weights loaded and saved) are kept at their CPU seconds: process start-up and file I/O, which a GPU does
    not speed up."""
    flop_cpu = sum(c * feats[t] for t, c in fit["coefficients"].items() if t in FLOP_TERMS)
    other_cpu = sum(c * feats[t] for t, c in fit["coefficients"].items() if t not in FLOP_TERMS)
    equivalent = flop_cpu * cpu_gemm_flops_s
    counted = sum(feats[t] for t in fit["coefficients"] if t in FLOP_TERMS)
    return {"cpu_seconds": flop_cpu + other_cpu, "gemm_equivalent_flops": equivalent, "counted_flops": counted,
            "gpu_seconds": equivalent / (peak_flops_s * efficiency) + other_cpu, "other_seconds": other_cpu}


def estimate(cpu_fits: dict[str, dict], rss_fits: dict[str, dict], cpu_gemm_flops_s: float,
             dtype: str = "float32", gpu: dict | None = None, efficiencies=EFFICIENCIES,
             targets: dict | None = None, calibrations=None, batch: int = 8) -> list[dict]:
    """Per target model and calibration size: each stage's and the pipeline's CPU seconds on this core (the fits
    extrapolated), GEMM-equivalent FLOPs and seconds on one GPU at each efficiency, and host peak RSS from the
    memory fit (the whole model resident, float32: `model.offload: none`)."""
    gpu = gpu or H100
    peak = gpu["bf16_flops"] if dtype in ("bfloat16", "float16") else gpu["fp32_flops"]
    out = []
    for name, t in (targets or TARGETS).items():
        for cal_name, n_seqs, seq_len in calibrations or CALIBRATIONS:
            d = shape_dims(SHAPES[t["shape"]], t["n_layers"], n_seqs, seq_len, t["vocab_size"], tied=False)
            feats = features(d, batch)
            stages = {}
            for stage, fit in cpu_fits.items():
                s = {"gpu": {f"{e:g}": gpu_seconds(fit, feats, cpu_gemm_flops_s, peak, e)["gpu_seconds"]
                             for e in efficiencies}}
                s.update({k: v for k, v in gpu_seconds(fit, feats, cpu_gemm_flops_s, peak, efficiencies[0]).items()
                          if k != "gpu_seconds"})
                if stage in rss_fits:
                    s["host_rss_bytes"] = predict(rss_fits[stage], feats)
                    # model.offload: disk: one block's weights (and the embeddings, head) instead of every block's
                    one_block = {**feats, "weight_bytes": 4.0 * (d["block_params"] + 2 * d["vocab_size"] * d["hidden_size"])}
                    s["host_rss_bytes_one_block"] = predict(rss_fits[stage], one_block)
                stages[stage] = s
            # the pipeline: capture, cluster, taylor, group, allocate and one prune (o_fang, the default method)
            main = [s for s in stages if not s.startswith("prune:") or s == "prune:o_fang"]
            total = {f"{e:g}": sum(stages[s]["gpu"][f"{e:g}"] for s in main) for e in efficiencies}
            out.append({
                "model": name, "calibration": cal_name, "n_seqs": n_seqs, "seq_len": seq_len, "dims": d,
                "features": feats, "dtype": dtype, "peak_flops_s": peak, "stages": stages,
                "pipeline_stages": main,
                "pipeline_cpu_seconds": sum(stages[s]["cpu_seconds"] for s in main),
                "pipeline_gpu_seconds": total,
                "paper_seconds": PAPER_7B_SECONDS if name == "LLaMA-2-7B" else None,
                "target_seconds": TARGET_SECONDS,
            })
    return out


# ------------------------------------------------------------------------------------------------------------
# measurement: scratch project, server, forked stage children


def _tokenizer():
    """A character tokenizer built in code (no hub): the stages load and save one beside the model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + ["\n"] + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def build_project(root: Path, spec: dict) -> None:
    """A random model of the spec's shape, random calibration ids and a params.yaml under `root`."""
    import torch
    import yaml
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    d = spec["dims"]
    torch.manual_seed(spec.get("seed", 0))
    config = LlamaConfig(
        hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"], num_hidden_layers=d["n_layers"],
        num_attention_heads=d["n_heads"], num_key_value_heads=d["n_kv_heads"], head_dim=d["head_dim"],
        vocab_size=d["vocab_size"], max_position_embeddings=max(2048, d["seq_len"]), tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    art = root / "artifacts"
    model.save_pretrained(art / "model")
    _tokenizer().save_pretrained(art / "model")
    del model
    ids = torch.randint(0, d["vocab_size"], (d["n_seqs"], d["seq_len"]),
                        generator=torch.Generator().manual_seed(spec.get("seed", 0) + 1))
    (art / "calib").mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids}, str(art / "calib" / "calib.safetensors"))
    params = yaml.safe_load(Path(spec["params"]).read_text())
    b = spec["batch"]
    params["capture"]["batch_size"] = min(b, d["n_seqs"])
    params["prune"]["batch_size"] = min(b, d["n_seqs"])
    params["taylor"]["batch_size"] = min(params["taylor"]["batch_size"], d["n_seqs"])
    params["cluster"]["pca_dim"] = min(params["cluster"]["pca_dim"], d["hidden_size"])
    params["cluster"]["k"] = min(params["cluster"]["k"], d["tokens"])
    params["model"]["offload"] = "none"
    if spec["dtype"] != "float32":
        params["model"]["compute_dtype"] = spec["dtype"]
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _forked(fn, result_path: Path) -> dict:
    """Run `fn()` in a forked child; its measurements (or its error) come back through `result_path`."""
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            out = {"rss_before_kib": _status_kib("VmRSS"), "load1": os.getloadavg()[0]}
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            out.update(cpu_s=time.process_time() - c0, wall_s=time.perf_counter() - w0,
                       peak_rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                       load1_after=os.getloadavg()[0])
        except BaseException as exc:  # noqa: BLE001 - reported to the server, which raises
            out = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            code = 1
        try:
            result_path.write_text(json.dumps(out))
        finally:
            os._exit(code)
    _, status, _ = os.wait4(pid, 0)
    if not result_path.exists():
        return {"error": f"child exited with status {status} and no result (killed? out of memory?)"}
    return json.loads(result_path.read_text())


# The server's command: the stage layer (stages/bench.py) hands it the function that runs one stage by name,
# so this library module never imports a stage (a stage sits above the tools it calls).
SERVER = "from stages.bench import serve_scale; serve_scale()"


def serve(run_stage: Callable[[str, str], None]) -> None:
    """The per-configuration server (`SERVER`, started in the scratch project folder with SPEC.json as its
    argument): builds the project, then forks one child per stage, each calling `run_stage(stage, params)`.
    `run_stage` has imported every stage module before the first fork."""
    import torch

    spec = read_json(sys.argv[1])
    torch.set_num_threads(1)
    # what every stage imports lazily (transformers' LLaMA code, the tokenizer classes, scipy, faiss): imported
    # once here, so the children measure the stage's work, not the interpreter's first import of its libraries
    import faiss  # noqa: F401
    import scipy.optimize  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

    root = Path.cwd()
    results: dict = {"baseline_rss_kib": _status_kib("VmRSS"), "stages": {}}
    build = _forked(lambda: build_project(root, spec), root / "build.result.json")
    if "error" in build:
        results["error"] = f"build: {build['error']}"
    else:
        for stage in spec["stages"]:
            r = _forked(lambda s=stage: run_stage(s, "params.yaml"), root / f"{stage.replace(':', '_')}.result.json")
            results["stages"][stage] = r
            if "error" in r:
                results["error"] = f"{stage}: {r['error']}"
                break
    write_json(spec["result"], results)


def measure_config(shape_name: str, n_layers: int, n_seqs: int, seq_len: int, params: str | os.PathLike,
                   work: Path, dtype: str = "float32", batch: int = 8, stages=STAGES) -> dict:
    """One configuration in a fresh server process (see the module). Returns the row the fits read."""
    d = shape_dims(SHAPES[shape_name], n_layers, n_seqs, seq_len)
    config = f"{shape_name}/{n_layers}L/{n_seqs}x{seq_len}/{dtype}"
    root = Path(tempfile.mkdtemp(prefix=f"{shape_name}-{n_layers}L-{n_seqs}x{seq_len}-{dtype}-", dir=work))
    spec = {"dims": d, "params": str(Path(params).resolve()), "batch": batch, "dtype": dtype, "stages": list(stages),
            "result": str(root / "result.json"), "seed": 0}
    write_json(root / "spec.json", spec)
    repo = Path(__file__).resolve().parents[3]  # the folder holding fang/ and stages/
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FANG_NO_PROGRESS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    try:
        proc = subprocess.run([sys.executable, "-c", SERVER,
                               str(root / "spec.json")], cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not (root / "result.json").exists():
            raise FangError(f"bench scale: {config} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
        res = read_json(root / "result.json")
        if "error" in res:
            raise FangError(f"bench scale: {config}: {res['error']}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = res["baseline_rss_kib"]
    out = {"config": config, "shape": shape_name, "dtype": dtype, "batch": batch, "dims": d,
           "features": features(d, batch), "baseline_rss_kib": base, "stages": {}}
    for stage, r in res["stages"].items():
        out["stages"][stage] = {**r, "rss_growth_bytes": _growth(r)}
    return out


def _growth(r: dict) -> float:
    """Peak RSS over the child's RSS when it started. A forked child does not count the server's file-backed pages
    (the libraries' code) until it touches them, so its start is below the server's RSS, and its growth is the
    stage's own memory plus the library pages it touched."""
    return 1024.0 * (r["peak_rss_kib"] - r["rss_before_kib"])


def stage_rows(configs: list[dict], stage: str) -> list[dict]:
    """The rows `fit_terms` reads for one stage: the config's features with the stage's CPU seconds and growth."""
    return [{"config": c["config"], "features": c["features"], "cpu_s": c["stages"][stage]["cpu_s"],
             "rss_growth_bytes": _growth(c["stages"][stage])}
            for c in configs if stage in c["stages"]]


def gemm_rate(h: int, f: int, tokens: int = 1024, dtype: str = "float32", repeats: int = 3) -> dict:
    """This core's achieved matmul rate (FLOP per CPU second, one thread): [tokens, h] @ [h, f], best of repeats."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(tokens, h, generator=g).to(getattr(torch, dtype))
        b = torch.randn(h, f, generator=g).to(getattr(torch, dtype))
        a @ b  # warm-up
        best = math.inf
        for _ in range(repeats):
            c0 = time.process_time()
            a @ b
            best = min(best, time.process_time() - c0)
    finally:
        torch.set_num_threads(threads)
    flops = 2.0 * tokens * h * f
    return {"shape": [tokens, h, f], "dtype": dtype, "cpu_seconds": best, "flops_per_s": flops / max(best, 1e-9)}


def run_scale(params: str | os.PathLike, work: str | os.PathLike, plan: str = "default",
              dtypes: tuple[str, ...] = ("float32",), jobs: int = 1, stages=STAGES, log=print) -> dict:
    """Measure every configuration of `plan` in every dtype, fit each stage, estimate the targets."""
    require(plan in PLANS, f"--scale-plan={plan!r}: choose from {', '.join(PLANS)}")
    require(jobs >= 1, f"--scale-jobs={jobs}: give at least 1")
    for dt in dtypes:
        require(dt in ("float32", "bfloat16", "float16"), f"dtype {dt!r}: use float32, bfloat16 or float16")
        if dt != "float32":
            from ...core import params as _params

            require(hasattr(_params, "ModelParams") and "compute_dtype" in getattr(_params.ModelParams,
                                                                                   "__dataclass_fields__", {}),
                    f"dtype {dt}: this checkout has no model.compute_dtype; only float32 can be measured")
    work = Path(work).resolve()  # the servers run inside their scratch folders
    work.mkdir(parents=True, exist_ok=True)
    todo = [(s, n, b, L, dt) for dt in dtypes for (s, n, b, L) in PLANS[plan]]
    load_before = os.getloadavg()
    t0 = time.perf_counter()

    def one(item):
        s, n, b, L, dt = item
        row = measure_config(s, n, b, L, params, work, dt, stages=stages)
        log(f"bench scale: {row['config']}: " + ", ".join(f"{k} {v['cpu_s']:.1f} s" for k, v in row["stages"].items()))
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        configs = list(pool.map(one, todo))
    widest = max(SHAPES[s]["hidden_size"] for s, *_ in PLANS[plan])
    widest_shape = next(SHAPES[s] for s, *_ in PLANS[plan] if SHAPES[s]["hidden_size"] == widest)
    result = {
        "format": SCALE_FORMAT, "plan": plan, "dtypes": list(dtypes), "jobs": jobs, "vocab": VOCAB,
        "stages": list(stages), "configs": configs,
        "load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg()),
        "wall_seconds": time.perf_counter() - t0,
        "total_cpu_seconds": sum(v["cpu_s"] for c in configs for v in c["stages"].values()),
        "gemm": {dt: gemm_rate(widest_shape["hidden_size"], widest_shape["intermediate_size"], dtype=dt)
                 for dt in dtypes},
    }
    return analyse(result)


def analyse(result: dict) -> dict:
    """The fits and estimates of a measured `result` (its configs and GEMM rates), added in place and returned:
    rerunnable on a saved scale.json without measuring again."""
    result["fits"], result["estimates"] = {}, {}
    for c in result["configs"]:  # counted again: a change of the terms applies to saved measurements too
        c["features"] = features(c["dims"], c["batch"])
    result["assumptions"] = {"gpu": H100, "efficiencies": list(EFFICIENCIES), "paper_7b_seconds": PAPER_7B_SECONDS,
                             "target_seconds": TARGET_SECONDS, "cpu_terms": {s: list(CPU_TERMS[s]) for s in result["stages"]},
                             "rss_terms": list(RSS_TERMS)}
    for dt in result["dtypes"]:
        rows_dt = [c for c in result["configs"] if c["dtype"] == dt]
        cpu_fits = {s: fit_terms(stage_rows(rows_dt, s), CPU_TERMS[s], "cpu_s") for s in result["stages"]}
        rss_fits = {s: fit_terms(stage_rows(rows_dt, s), RSS_TERMS, "rss_growth_bytes") for s in result["stages"]}
        result["fits"][dt] = {"cpu": cpu_fits, "rss": rss_fits}
        result["estimates"][dt] = estimate(cpu_fits, rss_fits, result["gemm"][dt]["flops_per_s"], dt)
    return result


def refit(path: str | os.PathLike) -> dict:
    """The saved scale.json at `path`, its fits and estimates recomputed from its measurements (`--scale-refit`:
    after a change of the fitted terms or the assumptions), without measuring."""
    require(Path(path).exists(), f"bench --scale-refit: no {path}; run `fang bench --parts scale` first")
    result = read_json(path)
    require(result.get("format") == SCALE_FORMAT, f"bench --scale-refit: {path} has format {result.get('format')}, "
                                                  f"expected {SCALE_FORMAT}; measure again")
    return analyse(result)


# ------------------------------------------------------------------------------------------------------------
# rendering

SCALE_START = "<!-- scale:start -->"
SCALE_END = "<!-- scale:end -->"


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _term(t: str, c: float) -> str:
    if t in FLOP_TERMS:
        return f"{t}: {1 / c / 1e9:.2f} GFLOP/s" if c > 0 else f"{t}: 0"
    if t == "weight_bytes":
        return f"{t}: {c * 2**30:.2f} s/GiB"
    if t == "const":
        return f"const: {c:.2f} s"
    return f"{t}: {c * 1e3:.3g} ms each" if t == "layers" else f"{t}: {c * 1e6:.3g} µs each"


def _yes(t: float, limit: float) -> str:
    return "yes" if t < limit else "no"


def render_scale(result: dict, when: str, machine: str) -> str:
    """The scale block of docs/results.md (and artifacts/bench/scale.md)."""
    stages = result["stages"]
    out = [f"<!-- generated by `fang bench --parts scale` on {when}; rerun it instead of editing -->",
           f"Measured on {machine}; plan `{result['plan']}`: random-weight LLaMA-shaped models (vocabulary "
           f"{result['vocab']}, tied embeddings), every stage's `run()` in a fresh forked process with one torch thread, "
           f"{result['jobs']} configuration(s) at a time. Load average {result['load_avg_before'][0]:.1f} before and "
           f"{result['load_avg_after'][0]:.1f} after, on {result.get('machine', {}).get('cores_usable', '?')} cores "
           f"({result['wall_seconds'] / 60:.0f} min wall for {result['total_cpu_seconds'] / 60:.1f} CPU-min of stage "
           "work): **process CPU seconds are the primary figure**; wall seconds include the time other jobs held the "
           "cores.", ""]
    for dt in result["dtypes"]:
        configs = [c for c in result["configs"] if c["dtype"] == dt]
        header = ["shape (h, f)", "layers", "tokens", "load1"] + stages + ["wall s, all stages"]
        rows, mem = [], []
        for c in configs:
            d = c["dims"]
            per = 1e6 / (d["n_layers"] * d["tokens"])
            first = [f"{c['shape']} ({d['hidden_size']}, {d['intermediate_size']})", str(d["n_layers"]),
                     f"{d['n_seqs']}×{d['seq_len']}"]
            loads = [r["load1"] for r in c["stages"].values()]
            rows.append(first + [f"{min(loads):.1f}–{max(loads):.1f}"]
                        + [f"{c['stages'][s]['cpu_s']:.1f} ({c['stages'][s]['cpu_s'] * per:,.0f})" for s in stages]
                        + [f"{sum(r['wall_s'] for r in c['stages'].values()):.0f}"])
            mem.append(first + [f"{c['stages'][s]['peak_rss_kib'] / 1024:,.0f}" for s in stages])
        out += [f"**Measured ({dt})**: CPU seconds per stage (CPU µs per layer and calibration token in parentheses).", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        starts = [r["rss_before_kib"] / 1024 for c in configs for r in c["stages"].values()]
        out += ["", f"Peak RSS per stage, MiB (the whole float32 model resident; a child starts at "
                f"{min(starts):,.0f}–{max(starts):,.0f} MiB, the imports, and the fits below use the growth over that):", "",
                "| " + " | ".join(header[:3] + stages) + " |", "|" + "---|" * (3 + len(stages))]
        out += ["| " + " | ".join(r) + " |" for r in mem]
        g = result["gemm"][dt]
        out += ["", f"**Fits ({dt})**: CPU seconds = Σ c·term, non-negative least squares over the "
                f"{len(configs)} configurations; a FLOP term is shown as the rate 1/c it ran at (this core's "
                f"{g['shape'][0]}×{g['shape'][1]}×{g['shape'][2]} float matmul: {g['flops_per_s'] / 1e9:.1f} GFLOP/s). "
                "Peak RSS growth over the baseline is fitted the same way on byte counts (coefficient = bytes held per "
                "counted byte).", "",
                "| stage | CPU fit | rms / max residual | RSS growth fit | rms / max residual |",
                "|---|---|---|---|---|"]
        fits = result["fits"][dt]
        for s in stages:
            cf, rf = fits["cpu"][s], fits["rss"][s]
            cpu_terms = "; ".join(_term(t, c) for t, c in cf["coefficients"].items() if c > 0) or "0"
            rss_terms = "; ".join(f"{t} × {c:.3g}" if t != "const" else f"{c / 2**20:.0f} MiB"
                                  for t, c in rf["coefficients"].items() if c > 0) or "0"
            out.append(f"| {s} | {cpu_terms} | {cf['rms_relative_residual']:.0%} / {cf['max_abs_relative_residual']:.0%} "
                       f"| {rss_terms} | {rf['rms_relative_residual']:.0%} / {rf['max_abs_relative_residual']:.0%} |")
        effs = [f"{e:g}" for e in result["assumptions"]["efficiencies"]]
        ests = result["estimates"][dt]
        gpu = result["assumptions"]["gpu"]
        out += ["", f"**Estimates ({dt}, one {gpu['name']})**, the fits extrapolated to the full models. GPU seconds = "
                "each FLOP term's fitted CPU seconds × this core's matmul rate (the term's work in GEMM-equivalent "
                f"FLOPs) ÷ (peak {ests[0]['peak_flops_s'] / 1e12:.1f} TFLOP/s × efficiency), plus the terms that are "
                "not FLOPs (fixed start-up, weights read and written, the LAP per layer) at their CPU seconds. "
                f"Pipeline = {', '.join(ests[0]['pipeline_stages'])}. Host RSS: the largest stage's fitted peak in "
                "float32, with every block resident (`model.offload: none`, as measured) or one block (the fit's weight "
                "term applied to one block, embeddings and head: what `model.offload: disk` holds, on a GPU machine "
                "split between host and device). Last two columns at 40% / 10%.", "",
                "| model | calibration | pipeline, this core | GEMM-eq. PFLOP | "
                + " | ".join(f"H100 at {float(e):.0%}" for e in effs)
                + f" | largest stage at {float(effs[0]):.0%} | host RSS, every block resident | host RSS, one block "
                "resident | < 1 h (paper) | < 15 min (ours) |",
                "|---|---|---|---|" + "---|" * len(effs) + "---|---|---|---|---|"]
        for e in ests:
            st = e["stages"]
            eq = sum(st[s]["gemm_equivalent_flops"] for s in e["pipeline_stages"])
            big = max(e["pipeline_stages"], key=lambda s: st[s]["gpu"][effs[0]])
            rss_stage = max(st, key=lambda s: st[s].get("host_rss_bytes", 0))
            one_stage = max(st, key=lambda s: st[s].get("host_rss_bytes_one_block", 0))
            t = e["pipeline_gpu_seconds"]
            out.append(f"| {e['model']} | {e['calibration']} | {_dur(e['pipeline_cpu_seconds'])} | {eq / 1e15:,.2f} | "
                       + " | ".join(_dur(t[x]) for x in effs)
                       + f" | {big} ({_dur(st[big]['gpu'][effs[0]])}) | {st[rss_stage]['host_rss_bytes'] / 2**30:,.0f} GiB "
                       f"({rss_stage}) | {st[one_stage]['host_rss_bytes_one_block'] / 2**30:,.1f} GiB ({one_stage}) | " + " / ".join(_yes(t[x], 3600) for x in effs) + " | "
                       + " / ".join(_yes(t[x], 900) for x in effs) + " |")
        out += [""]
    out += ["Approximate: every measured shape has f/h ≈ 2.7, so h- and f-sized terms cannot be told apart by the "
            "data, and a Gram/Hessian accumulation (T·f² per layer) grows like the forward's FLOPs: a zero coefficient "
            "on it means the fit folded it into the forward term. LLaMA-2-70B has f/h = 3.5, where f² is 1.6× larger "
            "against a block's parameters than at 7B, which the fit does not see; the fits are extrapolated 2× "
            "beyond the widest measured width for 70B, and in tokens from at most 8,192 at the 1.1B width and 1,024 at "
            "7B's to 32,768 (ours) and 262,144 (the paper's); a FLOP term's GPU rate assumes the GPU keeps the "
            "same share of its GEMM peak that the CPU kept of its own (false for Python- and memory-bound work); "
            "see docs/scale.md \"Cost growth, measured\"."]
    return "\n".join(out).rstrip() + "\n"
