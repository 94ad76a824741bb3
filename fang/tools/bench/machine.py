"""What a benchmark was measured on: CPU, cores, RAM, library versions, device."""

from __future__ import annotations

import os
import platform

import torch


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
