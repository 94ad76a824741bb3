"""Which parts a `fang bench` run measures, its comma-separated options, and carrying the parts it does not
rerun over from the previous bench.json (`--keep`)."""

from __future__ import annotations

import os

from ...core.atomic import read_json
from ...core.errors import FangError, require
from ...core.progress import console
from .render import BENCH_FORMAT

PARTS = ("pipeline", "memory", "inference", "profile", "scale")
DEFAULT_PARTS = ("pipeline", "memory", "inference")  # profile is opt-in: it reruns capture and taylor on a subset
# scale is opt-in too (random models at several sizes, ~15 CPU-minutes); it writes its own scale.json and block


def names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def ints(text: str, option: str) -> list[int]:
    try:
        values = [int(t) for t in names(text)]
    except ValueError:
        raise FangError(f"{option}={text!r}: expected comma-separated integers, e.g. 1,8") from None
    require(bool(values) and all(v > 0 for v in values), f"{option}={text!r}: give positive integers")
    return values


def chosen_parts(parts: str) -> list[str]:
    """The parts `--parts` names, each one of PARTS."""
    wanted = names(parts)
    unknown = [p for p in wanted if p not in PARTS]
    require(bool(wanted) and not unknown, f"--parts={parts!r}: choose from {', '.join(PARTS)}")
    return wanted


def keep_previous(result: dict, measured: dict, wanted: list[str], previous_path: str | os.PathLike) -> None:
    """Carry the parts not rerun over from the previous bench.json, each with the time it was measured."""
    if not os.path.exists(previous_path):
        console.print("[yellow]bench --keep: no previous artifacts/bench/bench.json; nothing to keep[/yellow]")
        return
    previous = read_json(previous_path)
    require(previous.get("format") == BENCH_FORMAT,
            f"bench --keep: {previous_path} has format {previous.get('format')}, expected {BENCH_FORMAT}; "
            "rerun every part instead")
    require(previous.get("machine", {}).get("cpu") == result["machine"]["cpu"],
            "bench --keep: the previous bench.json was measured on another machine; rerun every part instead")
    for part in PARTS:
        if part not in wanted and part in previous:
            result[part] = previous[part]
            measured[part] = previous.get("measured", {}).get(part, previous["time"])
