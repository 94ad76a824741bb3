"""The compute floor of the calibration set (a plain forward, a forward+backward of the dense model), and
cProfile of a stage call."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ...core.errors import require
from ...core.progress import progress
from ...model.layerwise import batch_slices
from ...model.offload import block_stream, place_model, streamed_forward

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

    A streamed model (model.offload) runs the forward with one block on the device at a time
    (`streamed_forward`: every block is fetched once per batch, so the floor includes those reads). Its
    forward+backward is not measured (None, with the reason): a whole-model backward keeps every
    block's weights alive in its graph until the backward reaches them, which is what streaming
    avoids; taylor gets its gradients block by block instead.
    """
    device = torch.device(device)
    place_model(model, device)
    streamed = block_stream(model) is not None
    n_seq, seq_len = input_ids.shape
    ids = subsample(input_ids, max_seqs, max_tokens)
    tokens = ids.numel()
    full_tokens = n_seq * seq_len

    @torch.no_grad()
    def forward(batch: torch.Tensor) -> None:
        with streamed_forward(model):
            model(input_ids=batch, use_cache=False)

    embed = model.get_input_embeddings()

    def forward_backward(batch: torch.Tensor) -> None:
        emb = embed(batch).detach().requires_grad_(True)
        loss = model(inputs_embeds=emb, labels=batch, use_cache=False).loss
        loss.backward()

    fwd = _timed_passes(forward, ids, forward_batch, device, "floor: forward")
    fwd_bwd = None
    if not streamed:
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
        "threads": torch.get_num_threads(),  # a stage timed at another thread count is not compared with it
        "calib_sequences": n_seq,
        "seq_len": seq_len,
        "calib_tokens": full_tokens,
        "sequences_measured": ids.shape[0],
        "tokens_measured": tokens,
        "forward": entry(fwd, forward_batch),
        "forward_backward": None if fwd_bwd is None else {
            **entry(fwd_bwd, backward_batch), "backward": "activation gradients only (weights frozen), as taylor computes"},
        **({"forward_backward_skipped": "model.offload streams the blocks: a whole-model backward would keep every "
                                        "block's weights in its graph"} if streamed else {}),
    }


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
