"""Run-time device choice: CUDA when present, CPU otherwise."""

import os

import torch


def pick_device() -> torch.device:
    # FANG_DEVICE lets a user force e.g. "cpu" on a GPU box; otherwise prefer CUDA.
    forced = os.environ.get("FANG_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
