"""Benchmarks: stage cost against the compute floor, the memory footprint, inference speed of pruned models.

Three parts, each usable alone (the `bench` stage runs them and writes JSON, Markdown and a README
fragment):

- pipeline: the wall time and peak RSS of every stage (the latest artifacts/timings.jsonl entry per
  stage and arguments) next to the compute floor measured in the same bench run: one plain
  forward pass and one forward+backward of the dense model over the calibration tokens, scaled
  per token when only a subsample is measured. Targets are checked as ratios against that floor.
- memory: the bytes per token and layer of the capture store (from its arrays' shapes and dtypes),
  its measured compression ratio, and an estimate for LLaMA-2-7B at 128 x 2048 calibration tokens
  whose formulas and inputs are written out so the numbers can be checked by hand.
- inference: prefill and greedy-decode tokens/s of every pruned model against the dense one,
  measured interleaved in one run (median of repeats), with parameter counts and checkpoint sizes.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .capture import FULL_ARRAYS
from .errors import FangError, require
from .layerwise import batch_slices
from .modeling import count_block_params
from .progress import progress
from .readme import replace_between_markers

BENCH_FORMAT = 1
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"

# The default pipeline in order; stages not listed (e.g. bench itself) are shown after these.
STAGE_ORDER = ("fetch_model", "fetch_data", "calibrate", "capture", "cluster", "taylor", "group", "allocate",
               "prune", "evaluate", "report")
# A cold run producing one pruned model, evaluation excluded (the issue's definition). The sweep
# and report are left out on purpose: they would inflate the denominator and make the rerun
# target easier to meet than it is for a user pruning one model.
COLD_STAGES = ("fetch_model", "fetch_data", "calibrate", "capture", "cluster", "taylor", "group", "allocate", "prune")
# What `dvc repro` reruns after a change of prune.sparsity alone (dvc.yaml: allocate depends on
# sweep.sparsities, not prune.sparsity), evaluation excluded.
RERUN_STAGES = ("prune",)
NOT_PIPELINE = ("bench",)  # stages logged to timings.jsonl that are not part of the pipeline

LLAMA2_7B = {
    "name": "LLaMA-2-7B",
    "n_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "n_heads": 32,
    "n_kv_heads": 32,
    "head_dim": 128,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


# ------------------------------------------------------------------------------------------------------------
# machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                # x86 names it "model name"; some ARM kernels only give "Hardware" or "Processor"
                if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What the numbers were measured on: CPU, cores, RAM, library versions, device."""
    import psutil
    import transformers

    device = torch.device(device)
    info = {
        "cpu": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        # the cores this process may use (a container or taskset can restrict them)
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory)
    return info


def machine_line(m: dict) -> str:
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    return (f"{m['cpu']}, {m['cores_usable']} usable cores ({m['cores_logical']} logical, "
            f"{m['torch_threads']} torch threads), "
            f"{m['ram_bytes'] / 2**30:.0f} GiB RAM, torch {m['torch']}, device {m['device']}{gpu}")


# ------------------------------------------------------------------------------------------------------------
# stage timings


def _clean_args(args: Iterable[Any]) -> list[str]:
    # unset CLI overrides are logged as "None"; they say nothing about the run
    return [str(a) for a in args if str(a) != "None"]


def _is_main_prune(entry: dict) -> bool:
    """`fang prune` writing artifacts/pruned (no --out), as opposed to a sweep run."""
    raw = [str(a) for a in entry.get("args", [])]
    out = raw[2] if len(raw) >= 3 else "None"
    return entry["stage"] == "prune" and out in ("None", "artifacts/pruned")


# stages that take --source (the calibration-bias study) and where it sits in their logged arguments
SOURCE_ARG = {"calibrate": 0, "capture": 0, "cluster": 0, "taylor": 0, "group": 0, "allocate": 0, "prune": 3}


def _source(entry: dict) -> str | None:
    """The bias-study calibration source a logged stage ran for; None for the main pipeline."""
    raw = [str(a) for a in entry.get("args", [])]
    i = SOURCE_ARG.get(entry["stage"])
    return raw[i] if i is not None and len(raw) > i and raw[i] != "None" else None


def read_timings(path: str | os.PathLike) -> list[dict]:
    """The latest entry per (stage, arguments) of a timings.jsonl, in pipeline order.

    Unreadable lines (a run killed while appending) are skipped: the file is a log, not an artifact.
    """
    path = Path(path)
    if not path.exists():
        return []
    latest: dict[tuple, dict] = {}
    with open(path) as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(entry, dict) or "stage" not in entry or "seconds" not in entry:
                continue
            args = _clean_args(entry.get("args", []))
            key = (entry["stage"], tuple(args))
            latest.pop(key, None)  # re-insert so dict order stays chronological
            latest[key] = {
                "stage": entry["stage"],
                "args": args,
                "label": " ".join([entry["stage"], *args]),
                "seconds": float(entry["seconds"]),
                "peak_rss_mib": entry.get("peak_rss_mib"),
                "time": entry.get("time"),
                "main_prune": _is_main_prune(entry),
                "source": _source(entry),
            }
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return sorted(latest.values(), key=lambda e: (order.get(e["stage"], len(order)), e["label"]))


# ------------------------------------------------------------------------------------------------------------
# compute floor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def subsample(input_ids: torch.Tensor, max_seqs: int | None = None, max_tokens: int | None = None) -> torch.Tensor:
    """The first sequences of the calibration set, whole sequences only.

    Sequences keep their length L because attention cost per token depends on L: cutting them
    shorter would make the per-token floor too cheap.
    """
    n_seq, seq_len = input_ids.shape
    n = n_seq
    if max_seqs is not None:
        require(max_seqs > 0, f"--max-seqs={max_seqs} must be positive")
        n = min(n, max_seqs)
    if max_tokens is not None:
        require(max_tokens > 0, f"--tokens={max_tokens} must be positive")
        n = min(n, max(1, max_tokens // seq_len))
    return input_ids[:n]


def _timed_passes(step: Callable[[torch.Tensor], None], ids: torch.Tensor, batch_size: int, device: torch.device,
                  label: str) -> float:
    """Seconds for `step` over every batch of `ids`, after one untimed warm-up batch."""
    step(ids[:batch_size].to(device))  # first call pays one-off allocations and kernel selection
    _sync(device)
    seconds = 0.0
    with progress() as bar:
        task = bar.add_task(label, total=ids.shape[0])
        for sl in batch_slices(ids.shape[0], batch_size):
            batch = ids[sl].to(device)
            t0 = time.perf_counter()
            step(batch)
            _sync(device)
            seconds += time.perf_counter() - t0
            bar.advance(task, sl.stop - sl.start)
    return seconds


def measure_floor(
    model: nn.Module,
    input_ids: torch.Tensor,
    forward_batch: int,
    backward_batch: int,
    device: torch.device | str = "cpu",
    max_seqs: int | None = None,
    max_tokens: int | None = None,
) -> dict:
    """Compute floor of the calibration set: a plain no-grad forward and a forward+backward, per token and in full.

    The forward is the model's plain forward, LM head included (capture stops before it, so its
    ratio is slightly flattered on large-vocabulary models). The backward computes activation
    gradients only (weights frozen, graph started at the input embeddings), which is all `taylor`
    needs; weight gradients would add work no stage does and make the floor too generous.
    """
    device = torch.device(device)
    model.to(device).eval()
    n_seq, seq_len = input_ids.shape
    ids = subsample(input_ids, max_seqs, max_tokens)
    tokens = ids.numel()
    full_tokens = n_seq * seq_len

    @torch.no_grad()
    def forward(batch: torch.Tensor) -> None:
        model(input_ids=batch, use_cache=False)

    embed = model.get_input_embeddings()

    def forward_backward(batch: torch.Tensor) -> None:
        emb = embed(batch).detach().requires_grad_(True)
        loss = model(inputs_embeds=emb, labels=batch, use_cache=False).loss
        loss.backward()

    fwd = _timed_passes(forward, ids, forward_batch, device, "floor: forward")
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        fwd_bwd = _timed_passes(forward_backward, ids, backward_batch, device, "floor: forward+backward")
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)

    def entry(seconds: float, batch: int) -> dict:
        per_token = seconds / tokens
        return {"batch_size": batch, "seconds_measured": round(seconds, 4), "seconds_per_token": per_token,
                "seconds_full": round(per_token * full_tokens, 3)}

    return {
        "calib_sequences": n_seq,
        "seq_len": seq_len,
        "calib_tokens": full_tokens,
        "sequences_measured": ids.shape[0],
        "tokens_measured": tokens,
        "forward": entry(fwd, forward_batch),
        "forward_backward": {**entry(fwd_bwd, backward_batch),
                             "backward": "activation gradients only (weights frozen), as taylor computes"},
    }


def _status(ratio: float | None, limit: float) -> str:
    if ratio is None:
        return "no data"
    return "met" if ratio <= limit else "missed"


def check_targets(timings: list[dict], floor: dict | None) -> list[dict]:
    """The issue's targets as ratios (stage time / floor), each met, missed or without data."""
    by_stage: dict[str, list[dict]] = {}
    for e in timings:
        if e.get("source") is None:  # the bias study's per-source runs are not the default pipeline
            by_stage.setdefault(e["stage"], []).append(e)

    def one(stage: str) -> dict | None:
        if stage == "prune":
            mains = [e for e in by_stage.get("prune", []) if e["main_prune"]]
            return mains[-1] if mains else None
        entries = by_stage.get(stage, [])
        return entries[-1] if entries else None  # stages run without arguments have one entry

    fwd = floor["forward"]["seconds_full"] if floor else None
    fwd_bwd = floor["forward_backward"]["seconds_full"] if floor else None
    rows: list[dict] = []

    def add(name: str, stages: dict[str, dict | None], denom: float | None, denom_name: str, limit: float,
            denom_missing: list[str] | None = None) -> None:
        have = [e for e in stages.values() if e is not None]
        missing = [s for s, e in stages.items() if e is None] + list(denom_missing or [])
        if denom is None and not denom_missing:
            missing.append("compute floor")
        seconds = sum(e["seconds"] for e in have) if len(have) == len(stages) else None
        ratio = seconds / denom if (seconds is not None and denom) else None
        rows.append({"target": name, "stages": [e["label"] for e in have], "seconds": seconds,
                     "reference": denom_name, "reference_seconds": denom,
                     "ratio": None if ratio is None else round(ratio, 4), "limit": limit,
                     "status": _status(ratio, limit), "missing": missing})

    add("capture ≤ 1.3× forward", {"capture": one("capture")}, fwd, "forward", 1.3)
    add("taylor ≤ 1.3× forward+backward", {"taylor": one("taylor")}, fwd_bwd, "forward+backward", 1.3)
    add("cluster+group+allocate ≤ 0.5× forward", {s: one(s) for s in ("cluster", "group", "allocate")}, fwd,
        "forward", 0.5)
    prunes = by_stage.get("prune", [])
    for e in prunes:
        add(f"{e['label']} ≤ 2× forward", {e["label"]: e}, fwd, "forward", 2.0)
    if not prunes:
        add("prune ≤ 2× forward", {"prune": None}, fwd, "forward", 2.0)
    cold = {s: one(s) for s in COLD_STAGES}
    cold_missing = [s for s, e in cold.items() if e is None]
    cold_seconds = None if cold_missing else sum(e["seconds"] for e in cold.values())
    add("rerun after prune.sparsity ≤ 15% of cold run", {s: one(s) for s in RERUN_STAGES}, cold_seconds,
        "cold run (" + " + ".join(COLD_STAGES) + ")", 0.15, denom_missing=[f"cold-run {s}" for s in cold_missing])
    return rows


# ------------------------------------------------------------------------------------------------------------
# memory


def _dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _dims(n_layers: int, hidden: int, ffn: int, n_heads: int, head_dim: int) -> dict[str, int]:
    return {"hidden_size": hidden, "intermediate_size": ffn, "attn_width": n_heads * head_dim}


def capture_footprint(store_path: str | os.PathLike) -> dict:
    """Bytes per calibration token and layer of a capture store, from its arrays' shapes and dtypes.

    Every array is described by how it scales: per token and layer ([layers(+1), T, width]),
    per layer ([layers, width], the input statistics) or per token (token_ids). Widths are named
    by the config dimension they equal, so the same layout can be projected onto another model.
    Disk bytes are the array's files as stored (Zarr's default compression), logical bytes
    shape x itemsize.
    """
    from .capture import open_capture

    store_path = Path(store_path)
    group = open_capture(store_path)
    a = group.attrs
    n_layers, n_samples, seq_len = int(a["n_layers"]), int(a["n_samples"]), int(a["seq_len"])
    dims = _dims(n_layers, int(a["hidden_size"]), int(a["intermediate_size"]), int(a["n_heads"]), int(a["head_dim"]))
    n_tok = n_samples * seq_len
    if a.get("pca_dim"):  # projected features: a fixed width (cluster.pca_dim), whatever the model
        dims["pca_dim"] = int(a["pca_dim"])
    arrays = []
    for name, arr in sorted(group.arrays(), key=lambda kv: kv[0]):
        shape = tuple(int(s) for s in arr.shape)
        itemsize = arr.dtype.itemsize
        logical = math.prod(shape) * itemsize
        entry: dict = {"name": name, "shape": list(shape), "dtype": str(arr.dtype), "itemsize": itemsize,
                       "logical_bytes": logical, "disk_bytes": _dir_size(store_path / name)}
        width = shape[-1]
        # name the width by the config dimension it equals (hidden first: attn_width often equals it)
        width_dim = next((k for k, v in dims.items() if v == width), None)
        if len(shape) == 3 and shape[1] == n_tok:
            entry.update(scales="token_layer", layer_offset=shape[0] - n_layers, width=width, width_dim=width_dim,
                         bytes_per_token_layer=width * itemsize)
        elif shape[0] == n_layers and name != "token_ids":  # statistics, FC, PCA: per layer, not per token
            entry.update(scales="layer", width=width, width_dim=width_dim)
        else:
            entry.update(scales="token", bytes_per_token=logical // max(n_tok, 1))
        arrays.append(entry)
    per_tl = [e for e in arrays if e["scales"] == "token_layer"]
    logical = sum(e["logical_bytes"] for e in arrays)
    disk = sum(e["disk_bytes"] for e in arrays)
    bulk_logical = sum(e["logical_bytes"] for e in per_tl)
    bulk_disk = sum(e["disk_bytes"] for e in per_tl)
    return {
        "path": str(store_path),
        "model": {"n_layers": n_layers, "hidden_size": dims["hidden_size"], "intermediate_size": dims["intermediate_size"],
                  "n_heads": int(a["n_heads"]), "head_dim": int(a["head_dim"])},
        "n_samples": n_samples,
        "seq_len": seq_len,
        "tokens": n_tok,
        "dtype": a.get("dtype"),
        "arrays": arrays,
        # block_io holds layers + 1 slices; per layer means per block here, its extra slice is listed apart
        "bytes_per_token_layer": sum(e["bytes_per_token_layer"] for e in per_tl),
        "pca_dim": dims.get("pca_dim"),
        "logical_bytes": logical,
        "disk_bytes": _dir_size(store_path),
        "arrays_disk_bytes": disk,
        # the features dominate the store; their ratio is what projects onto a larger model
        "compression_ratio": bulk_disk / bulk_logical if bulk_logical else None,
    }


def _param_count(m: dict) -> tuple[int, str]:
    d, f, h, kv, hd, v, n = (m["hidden_size"], m["intermediate_size"], m["n_heads"], m["n_kv_heads"], m["head_dim"],
                            m["vocab_size"], m["n_layers"])
    per_block = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f + 2 * d
    embeddings = v * d * (1 if m["tie_word_embeddings"] else 2)
    total = n * per_block + embeddings + d
    formula = (f"n_layers·(d·(heads+2·kv_heads)·head_dim + heads·head_dim·d + 3·d·ffn + 2·d) + vocab·d·{1 if m['tie_word_embeddings'] else 2} + d"
               f" = {n}·({d}·({h}+2·{kv})·{hd} + {h}·{hd}·{d} + 3·{d}·{f} + 2·{d}) + {v}·{d}·{1 if m['tie_word_embeddings'] else 2} + {d}")
    return total, formula


def store_bytes_formula(footprint: dict, model: dict, n_tok: int, itemsize: int) -> tuple[int, str, int]:
    """Logical bytes of the feature arrays of a capture store for `model` and `n_tok` tokens.

    Returns (bytes, formula with its numbers, elements per token). Applying this to the measured
    store's own model reproduces its logical size: that is the check of the projection.
    """
    dims = _dims(model["n_layers"], model["hidden_size"], model["intermediate_size"], model["n_heads"], model["head_dim"])
    if footprint.get("pca_dim"):
        dims["pca_dim"] = footprint["pca_dim"]
    terms, numbers, elements, total = [], [], 0, 0
    for e in footprint["arrays"]:
        if e["scales"] != "token_layer":
            continue
        if e["width_dim"] is None:
            raise FangError(f"capture array {e['name']} has width {e['width']}, which matches no model dimension")
        layers = model["n_layers"] + e["layer_offset"]
        width = dims[e["width_dim"]]
        # the full arrays take the store dtype (`itemsize`); the projected features stay float32
        size = itemsize if e["name"] in FULL_ARRAYS else e["itemsize"]
        elements += layers * width
        total += n_tok * layers * width * size
        terms.append(f"{e['name']}: (n_layers{'+' + str(e['layer_offset']) if e['layer_offset'] else ''})·{e['width_dim']}·{size} B")
        numbers.append(f"{layers}·{width}·{size}")
    formula = f"T·({' + '.join(terms)}) = {n_tok}·({' + '.join(numbers)})"
    return total, formula, elements


def estimate_memory(
    footprint: dict,
    target: dict | None = None,
    n_samples: int = 128,
    seq_len: int = 2048,
    batch_size: int = 8,
    feature_bytes: int = 2,
    weight_bytes: int = 2,
) -> dict:
    """Disk, RAM and GPU memory of the pipeline for `target` (default LLaMA-2-7B) at n_samples x seq_len tokens.

    - disk: the capture store's features (fp16), an uncompressed upper bound from the measured
      layout, and that bound times the compression ratio measured on `footprint`;
    - RAM: one block's hidden states for the whole calibration set in fp32 (N·L·d·4), which is
      what capture and prune hold; the store itself is never in RAM;
    - GPU: the fp16 weights plus the activations of one block for one batch of `batch_size`
      sequences; the eager attention score matrix is listed apart (fused SDPA/flash attention
      never materialises it).
    """
    m = dict(target or LLAMA2_7B)
    n_tok = n_samples * seq_len
    d, f, h, kv, hd = m["hidden_size"], m["intermediate_size"], m["n_heads"], m["n_kv_heads"], m["head_dim"]
    disk, disk_formula, elements = store_bytes_formula(footprint, m, n_tok, feature_bytes)
    ratio = footprint["compression_ratio"]

    ram = n_tok * d * 4
    params, params_formula = _param_count(m)
    weights = params * weight_bytes
    bl = batch_size * seq_len
    # live tensors of one block: input, normed input, attention output, residual (4·d); q, k, v
    # ((heads + 2·kv)·head_dim); MLP gate, up and act(gate)·up (3·ffn)
    act_width = 4 * d + (h + 2 * kv) * hd + 3 * f
    acts = bl * act_width * weight_bytes
    scores = batch_size * h * seq_len * seq_len * weight_bytes

    measured = footprint["model"]
    check_bytes, _, _ = store_bytes_formula(footprint, {**measured, "n_kv_heads": measured["n_heads"]},
                                            footprint["tokens"], _feature_itemsize(footprint))
    measured_features = sum(e["logical_bytes"] for e in footprint["arrays"] if e["scales"] == "token_layer")
    return {
        "model": m,
        "n_samples": n_samples,
        "seq_len": seq_len,
        "tokens": n_tok,
        "batch_size": batch_size,
        "disk": {
            "bytes_per_token_layer": disk / n_tok / m["n_layers"],
            "uncompressed_bytes": disk,
            "formula": disk_formula,
            "compression_ratio": ratio,
            "compressed_bytes": None if ratio is None else round(disk * ratio),
            "compression_measured_on": footprint["path"],
            "note": "per-layer input statistics (fp64, n_layers·(2·attn_width + 2·ffn)·8 B) and token_ids are negligible",
        },
        "ram": {
            "bytes": ram,
            "formula": f"N·L·d·4 B (fp32) = {n_samples}·{seq_len}·{d}·4",
        },
        "gpu": {
            "params": params,
            "params_formula": params_formula,
            "weights_bytes": weights,
            "weights_formula": f"params·{weight_bytes} B (fp16)",
            "activations_bytes": acts,
            "activations_formula": (f"b·L·(4·d + (heads+2·kv_heads)·head_dim + 3·ffn)·{weight_bytes} B = "
                                    f"{batch_size}·{seq_len}·(4·{d} + ({h}+2·{kv})·{hd} + 3·{f})·{weight_bytes}"),
            "attention_scores_bytes": scores,
            "attention_scores_formula": f"b·heads·L²·{weight_bytes} B = {batch_size}·{h}·{seq_len}²·{weight_bytes} (eager attention only)",
            "total_bytes": weights + acts,
            "total_bytes_eager": weights + acts + scores,
        },
        # the disk formula applied to the measured model must reproduce the measured store
        "check": {"formula_bytes_measured_model": check_bytes, "measured_feature_bytes": measured_features,
                  "ok": check_bytes == measured_features},
    }


def _feature_itemsize(footprint: dict) -> int:
    sizes = {e["itemsize"] for e in footprint["arrays"] if e["scales"] == "token_layer" and e["name"] in FULL_ARRAYS}
    if not sizes:  # a slim store: nothing in the store dtype to measure, the formula does not use it
        return 2
    require(len(sizes) == 1, f"capture store {footprint['path']} mixes feature dtypes: {sorted(sizes)}")
    return sizes.pop()


# ------------------------------------------------------------------------------------------------------------
# inference


@dataclass
class ModelEntry:
    name: str
    path: Path
    kind: str  # "dense" or "pruned"
    prune_report: dict | None = None  # the prune stage's JSON (method, target and achieved sparsity)


def find_models(artifacts: str | os.PathLike, select: list[str] | None = None) -> list[ModelEntry]:
    """The dense model, artifacts/pruned and every artifacts/sweep/<method>-<sparsity>/ holding a structure.json.

    `select` keeps pruned models whose name matches one of its shell patterns ("flap-*"); the
    dense model is always kept since every speedup is relative to it.
    """
    from .shrink import STRUCTURE_FILE

    artifacts = Path(artifacts)
    dense = artifacts / "model"
    require((dense / "config.json").exists(), f"no dense model at {dense}: run `dvc repro fetch_model` first")
    found = [ModelEntry("dense", dense, "dense")]
    candidates = []
    if (artifacts / "pruned" / STRUCTURE_FILE).exists():
        candidates.append(("pruned", artifacts / "pruned", artifacts / "metrics" / "prune.json"))
    sweep = artifacts / "sweep"
    if sweep.is_dir():
        for d in sorted(sweep.iterdir()):
            if (d / STRUCTURE_FILE).exists():
                candidates.append((d.name, d, sweep / f"{d.name}.prune.json"))
    for name, path, report in candidates:
        if select and not any(fnmatch.fnmatchcase(name, pat) for pat in select):
            continue
        found.append(ModelEntry(name, path, "pruned", _read_optional_json(report)))
    if select:
        known = {c[0] for c in candidates} | {"dense"}
        unknown = [p for p in select if not any(fnmatch.fnmatchcase(n, p) for n in known)]
        require(not unknown, f"--models {', '.join(unknown)} matched no model; found: {', '.join(sorted(known))}")
    return found


def _read_optional_json(path: Path) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def checkpoint_bytes(path: Path) -> int:
    """Bytes of the weight files (safetensors) of a checkpoint directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


@torch.no_grad()
def prefill_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, float]:
    """Seconds of the prefill of `prompt` [b, P] and of `new_tokens` greedy decode steps with the KV cache.

    The prefill computes logits for the last position only, as `generate` does. Decoding never
    stops early (no EOS check), so every model does exactly the same number of steps.
    """
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill = time.perf_counter() - t0
    cache = out.past_key_values
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return prefill, time.perf_counter() - t0


def _load(entry: ModelEntry, device: torch.device) -> nn.Module:
    from .modeling import load_any

    model, _ = load_any(entry.path, device)
    return model


def _warm_up(model: nn.Module, vocab: int, device: torch.device) -> None:
    # a short untimed run after loading: the first calls pay one-off allocations
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    prefill_decode(model, ids, 2, device)


def measure_inference(
    entries: list[ModelEntry],
    batch_sizes: list[int],
    prompt_len: int = 512,
    new_tokens: int = 128,
    repeats: int = 3,
    device: torch.device | str = "cpu",
    seed: int = 0,
    keep_loaded: bool | None = None,
) -> dict:
    """Prefill and decode tokens/s of every model, interleaved round by round, median of `repeats`.

    Each round measures every model at every batch size (in a rotated order, so no model is
    always first after another's cache effects); the median over rounds cancels drift in the
    machine's load. Models stay loaded between rounds when their checkpoints fit in half the
    available RAM, otherwise each is reloaded (and warmed up) for each measurement.
    """
    import psutil

    device = torch.device(device)
    require(bool(batch_sizes) and all(b > 0 for b in batch_sizes), f"batch sizes must be positive, got {batch_sizes}")
    require(prompt_len > 0 and new_tokens > 0, "prompt length and new tokens must be positive")
    require(repeats > 0, f"repeats={repeats} must be positive")
    sizes = {e.name: checkpoint_bytes(e.path) for e in entries}
    if keep_loaded is None:
        keep_loaded = device.type != "cpu" or sum(sizes.values()) < 0.5 * psutil.virtual_memory().available

    loaded: dict[str, nn.Module] = {}
    info: dict[str, dict] = {}

    def get(entry: ModelEntry) -> nn.Module:
        if entry.name in loaded:
            return loaded[entry.name]
        model = _load(entry, device)
        if entry.name not in info:
            info[entry.name] = {
                "block_params": count_block_params(model),
                "total_params": sum(p.numel() for p in model.parameters()),  # tied weights once
                "vocab_size": model.config.vocab_size,
            }
        _warm_up(model, info[entry.name]["vocab_size"], device)
        if keep_loaded:
            loaded[entry.name] = model
        return model

    vocab = None
    times: dict[tuple[str, int], dict[str, list[float]]] = {}
    with progress() as bar:
        task = bar.add_task("inference", total=repeats * len(batch_sizes) * len(entries))
        for r in range(repeats):
            for b in batch_sizes:
                k = r % len(entries)
                for entry in entries[k:] + entries[:k]:
                    model = get(entry)
                    if vocab is None:
                        vocab = info[entry.name]["vocab_size"]
                    # the same prompts for every model: seeded random ids (speed does not depend on the text)
                    g = torch.Generator().manual_seed(seed + b)
                    prompt = torch.randint(0, vocab, (b, prompt_len), generator=g).to(device)
                    pre, dec = prefill_decode(model, prompt, new_tokens, device)
                    slot = times.setdefault((entry.name, b), {"prefill": [], "decode": []})
                    slot["prefill"].append(pre)
                    slot["decode"].append(dec)
                    if not keep_loaded:
                        del model
                    bar.advance(task)

    dense = entries[0].name
    models = []
    for entry in entries:
        runs = []
        for b in batch_sizes:
            t = times[(entry.name, b)]
            pre, dec = statistics.median(t["prefill"]), statistics.median(t["decode"])
            runs.append({"batch_size": b, "prefill_seconds": [round(x, 5) for x in t["prefill"]],
                         "decode_seconds": [round(x, 5) for x in t["decode"]],
                         "prefill_tok_s": b * prompt_len / pre, "decode_tok_s": b * new_tokens / dec})
        models.append({"name": entry.name, "kind": entry.kind, "path": str(entry.path), **info[entry.name],
                       "checkpoint_bytes": sizes[entry.name], "runs": runs, **_prune_summary(entry)})
    base = {r["batch_size"]: r for r in models[0]["runs"]}
    dense_block = models[0]["block_params"]
    for m in models:
        m["block_sparsity"] = 1.0 - m["block_params"] / dense_block
        for r in m["runs"]:
            r["prefill_speedup"] = r["prefill_tok_s"] / base[r["batch_size"]]["prefill_tok_s"]
            r["decode_speedup"] = r["decode_tok_s"] / base[r["batch_size"]]["decode_tok_s"]
    return {"dense": dense, "prompt_len": prompt_len, "new_tokens": new_tokens, "batch_sizes": list(batch_sizes),
            "repeats": repeats, "statistic": "median", "models_kept_loaded": keep_loaded, "models": models}


def _prune_summary(entry: ModelEntry) -> dict:
    r = entry.prune_report or {}
    return {"method": r.get("method"), "target_sparsity": r.get("target_sparsity"),
            "achieved_sparsity": r.get("achieved_sparsity")}


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
             _num(t["ratio"], ".2f"), f"≤ {t['limit']:g}", status(t)] for t in targets]
    return _table(["target", "stage s", "reference s", "ratio", "limit", "status"], rows)


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


# ------------------------------------------------------------------------------------------------------------
# profile


def profile_call(fn: Callable[[], Any], top: int = 15) -> dict:
    """Run `fn` under cProfile: wall seconds and the `top` functions by own (self) time.

    Own time says where the CPU goes (a matmul, a fp16 conversion, a compressor) rather than
    which caller it was spent under.
    """
    import cProfile
    import pstats

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    seconds = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        where = name if file == "~" else f"{Path(file).name}:{line}({name})"
        rows.append({"function": where, "calls": ncalls, "self_seconds": round(tottime, 4),
                     "cumulative_seconds": round(cumtime, 4)})
    rows.sort(key=lambda r: -r["self_seconds"])
    return {"seconds": round(seconds, 3), "top": rows[:top]}


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
            out += [f"Compute floor over the {floor['calib_tokens']:,} calibration tokens ({floor['calib_sequences']} × "
                    f"{floor['seq_len']}), measured on {floor['tokens_measured']:,} tokens and scaled per token: "
                    f"forward {f['seconds_full']:.1f} s (batch {f['batch_size']}), forward+backward "
                    f"{fb['seconds_full']:.1f} s (batch {fb['batch_size']}, {fb['backward']}).", ""]
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
        out += ["Targets:", "", *_targets_table(pipe["targets"]), ""]
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
    """The README's results section (pasted between the bench markers by `update_readme`)."""
    out = [f"<!-- generated by `fang bench` on {result['time']}; rerun it instead of editing -->",
           f"Measured on {machine_line(result['machine'])}.", ""]
    pipe = result.get("pipeline")
    if pipe is not None:
        floor = pipe.get("floor")
        if floor:
            out += [f"**Pipeline cost**{_kept(result, 'pipeline')} against the compute floor (forward {floor['forward']['seconds_full']:.1f} s, "
                    f"forward+backward {floor['forward_backward']['seconds_full']:.1f} s over "
                    f"{floor['calib_tokens']:,} calibration tokens):", ""]
        else:
            out += [f"**Pipeline cost**{_kept(result, 'pipeline')}:", ""]
        out += [*_targets_table(pipe["targets"]), ""]
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
    """Replace the text between the bench markers of a README with `fragment` (see `fang.readme`)."""
    replace_between_markers(readme_path, fragment, README_START, README_END)
