"""Refuse, with the parameter to change, an allocation that cannot fit in this machine's memory.

The kernel's OOM killer ends a run without a word (the issue's cluster.k=1000 run died at 23.5 GB);
estimating the big arrays up front turns that into a one-line error.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import FangError

GIB = 2**30


def available_bytes() -> int:
    """Memory a new allocation can use: MemAvailable, or FANG_MEMORY_MIB when set (a cap for shared machines)."""
    cap = os.environ.get("FANG_MEMORY_MIB")
    if cap:
        try:
            return int(float(cap) * 2**20)
        except ValueError:
            raise FangError(f"FANG_MEMORY_MIB={cap!r} is not a number of MiB") from None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def check_fits(needed: int, what: str, parameter: str) -> None:
    """FangError naming `parameter` when `needed` bytes exceed the memory available now."""
    have = available_bytes()
    if needed > have:
        raise FangError(f"{parameter} needs about {_size(needed)} of memory for {what}, but only "
                        f"{_size(have)} is available: lower {parameter.split('=')[0]}")


def _existing(where: str | os.PathLike) -> Path:
    path = Path(where).resolve()
    while not path.exists():
        path = path.parent
    return path


def free_disk_bytes(where: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds `where` (its nearest existing parent)."""
    return shutil.disk_usage(_existing(where)).free


def check_disk(needed: int, where: str | os.PathLike, what: str, remedy: str) -> None:
    """FangError when `needed` bytes will not fit on the filesystem holding `where` (its nearest existing parent)."""
    free = free_disk_bytes(where)
    if needed > free:
        raise FangError(f"{what} needs about {_size(needed)} of disk, but only {_size(free)} is free at "
                        f"{_existing(where)}: {remedy}")
