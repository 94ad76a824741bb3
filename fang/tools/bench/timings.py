"""Pipeline cost: the latest timing of every stage (artifacts/timings.jsonl) and the targets, as ratios to the
compute floor (`floor.measure_floor`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


# The default pipeline in order; stages not listed (e.g. bench itself) are shown after these.
STAGE_ORDER = ("fetch_model", "fetch_data", "calibrate", "capture", "cluster", "taylor", "group", "allocate",
               "prune", "evaluate", "report")
# A cold run producing one pruned model, evaluation excluded (the definition). The sweep
# and report are left out on purpose: they would inflate the denominator and make the rerun
# target easier to meet than it is for a user pruning one model.
COLD_STAGES = ("fetch_model", "fetch_data", "calibrate", "capture", "cluster", "taylor", "group", "allocate", "prune")
# What `dvc repro` reruns after a change of prune.sparsity alone (dvc.yaml: allocate depends on
# sweep.sparsities, not prune.sparsity), evaluation excluded.
RERUN_STAGES = ("prune",)
NOT_PIPELINE = ("bench",)  # stages logged to timings.jsonl that are not part of the pipeline


# ------------------------------------------------------------------------------------------------------------
# stage timings


def _clean_args(args: Iterable[Any]) -> list[str]:
    # unset CLI overrides are logged as "None"; they say nothing about the run
    return [str(a) for a in args if str(a) != "None"]


def _prune_out(entry: dict) -> str | None:
    """The --out a logged `fang prune` ran with (its third argument); None when unset or not a prune."""
    raw = [str(a) for a in entry.get("args", [])]
    out = raw[2] if entry["stage"] == "prune" and len(raw) >= 3 else "None"
    return None if out == "None" else out


def _writes_outside_project(entry: dict) -> bool:
    """A prune run whose --out is an absolute path (a scratch check such as /tmp/x), not a pipeline output."""
    out = _prune_out(entry)
    return out is not None and os.path.isabs(out)


def _load5(entry: dict) -> float | None:
    """The 5-minute load average logged when the stage ended (entries before it was logged: None)."""
    load = entry.get("load_avg")
    return float(load[1]) if isinstance(load, list) and len(load) == 3 else None


def _is_main_prune(entry: dict) -> bool:
    """`fang prune` writing artifacts/pruned (no --out), as opposed to a sweep run."""
    return entry["stage"] == "prune" and _prune_out(entry) in (None, "artifacts/pruned")


# stages that take --source (the calibration-bias study) and where it sits in their logged arguments
SOURCE_ARG = {"calibrate": 0, "capture": 0, "cluster": 0, "taylor": 0, "group": 0, "allocate": 0, "prune": 3}


def _source(entry: dict) -> str | None:
    """The bias-study calibration source a logged stage ran for; None for the main pipeline."""
    raw = [str(a) for a in entry.get("args", [])]
    i = SOURCE_ARG.get(entry["stage"])
    return raw[i] if i is not None and len(raw) > i and raw[i] != "None" else None


def read_timings(path: str | os.PathLike, threads: int | None = None) -> list[dict]:
    """The latest entry per (stage, arguments) of a timings.jsonl, in pipeline order.

    Unreadable lines (a run killed while appending) are skipped: the file is a log, not an artifact.
    With `threads` (the floor's torch thread count) only runs at that count are read, where the run
    recorded one: a one-thread study lane beside a two-thread floor is not a ratio of anything.
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
            if _writes_outside_project(entry):
                continue
            if threads is not None and entry.get("threads") not in (None, threads):
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
                "load5": _load5(entry),
                "threads": entry.get("threads"),
                "main_prune": _is_main_prune(entry),
                "source": _source(entry),
            }
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return sorted(latest.values(), key=lambda e: (order.get(e["stage"], len(order)), e["label"]))


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
    fwd_bwd = floor["forward_backward"]["seconds_full"] if floor and floor.get("forward_backward") else None
    rows: list[dict] = []

    def add(name: str, stages: dict[str, dict | None], denom: float | None, denom_name: str, limit: float,
            denom_missing: list[str] | None = None) -> None:
        have = [e for e in stages.values() if e is not None]
        missing = [s for s, e in stages.items() if e is None] + list(denom_missing or [])
        if denom is None and not denom_missing:
            missing.append("compute floor")
        seconds = sum(e["seconds"] for e in have) if len(have) == len(stages) else None
        ratio = seconds / denom if (seconds is not None and denom) else None
        rss = [e["peak_rss_mib"] for e in have if e.get("peak_rss_mib") is not None]
        loads = [e["load5"] for e in have if e.get("load5") is not None]
        rows.append({"target": name, "stages": [e["label"] for e in have], "seconds": seconds,
                     "peak_rss_mib": max(rss) if rss else None,
                     # the busiest machine any of its stages ran on: a wall time next to other work is inflated
                     "load5": max(loads) if len(loads) == len(have) and loads else None,
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
