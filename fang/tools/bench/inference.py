"""Inference speed: prefill and greedy-decode tokens/s of every pruned model against the dense one."""

from __future__ import annotations

import fnmatch
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...core.errors import require
from ...core.progress import progress
from ...model.modeling import count_block_params
from ...model.offload import streamed_forward
from .floor import _sync

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
    from ...model.shrink import STRUCTURE_FILE

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
    """`_prefill_decode`; a streamed model (model.offload) fetches each block as the forward reaches it, so its
    speed includes one read of every block per forward (transfer-bound: not the speed of a model that fits)."""
    with streamed_forward(model):
        return _prefill_decode(model, prompt, new_tokens, device)


def _prefill_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, float]:
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


def _load(entry: ModelEntry, device: torch.device, offload: str = "none") -> nn.Module:
    from ...model.shrink import load_any

    model, _ = load_any(entry.path, device, offload=offload)
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
    offload: str = "none",
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
        model = _load(entry, device, offload)
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
            "repeats": repeats, **({"offload": offload} if offload != "none" else {}), "statistic": "median", "models_kept_loaded": keep_loaded, "models": models}


def _prune_summary(entry: ModelEntry) -> dict:
    r = entry.prune_report or {}
    return {"method": r.get("method"), "target_sparsity": r.get("target_sparsity"),
            "achieved_sparsity": r.get("achieved_sparsity")}
