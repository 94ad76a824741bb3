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
