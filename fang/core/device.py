"""Run-time device choice: CUDA when present, CPU otherwise."""

import os

import torch

from .errors import FangError


def pick_device() -> torch.device:
    # FANG_DEVICE lets a user force e.g. "cpu" on a GPU box; otherwise prefer CUDA.
    forced = os.environ.get("FANG_DEVICE")
    if forced:
        return _forced_device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _forced_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise FangError(f"FANG_DEVICE={name!r} is not a torch device name: use e.g. cpu, cuda or cuda:0") from None
    # torch.device() accepts any known type; whether this machine has one shows only at first use, mid-stage
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FangError(f"FANG_DEVICE={name!r} but this torch has no usable CUDA device: unset it or use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FangError(f"FANG_DEVICE={name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise FangError(f"FANG_DEVICE={name!r} but MPS is not available here: unset it or use cpu")
    elif device.type != "cpu":
        raise FangError(f"FANG_DEVICE={name!r}: fang runs on cpu, cuda or mps")
    return device


# model.compute_dtype: the dtype every block pass (capture, taylor, prune, ica, gprune, attribute) runs its
# weights and activations in. Statistics are accumulated in float32 or float64 whatever it is.
# The same names as fang.core.params.COMPUTE_DTYPES (not imported: params.py stays free of torch;
# tests/test_compute_dtype.py checks the two agree).
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_compute_dtype(name: str, device: torch.device | str) -> str:
    """The dtype name ("float32", "bfloat16" or "float16") block passes run in on `device`, for
    model.compute_dtype `name`. `auto`: bfloat16 on CUDA (float16 on a GPU without bfloat16), float32
    elsewhere (on CPU the evidence for half precision is not in yet: docs/scale.md "Compute dtype")."""
    if name not in COMPUTE_DTYPES:
        raise FangError(f"model.compute_dtype={name!r}: use one of {', '.join(COMPUTE_DTYPES)}")
    kind = torch.device(device).type
    if name == "auto":
        if kind != "cuda":
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if name == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise FangError("model.compute_dtype=bfloat16 but this GPU has no bfloat16 support: use float16 or auto")
    # float16 on CPU: torch runs LLaMA blocks forward and backward in it (checked, torch 2.13), slowly
    # without AVX512-FP16; it is allowed, not chosen by auto
    return name


def dtype_record(name: str) -> dict[str, str]:
    """What an output records of the compute dtype it was made in: nothing for float32, so outputs made
    in float32 keep the bytes they had before model.compute_dtype existed (locked results stay valid)."""
    return {} if name == "float32" else {"compute_dtype": name}
