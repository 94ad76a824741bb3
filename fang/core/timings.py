"""artifacts/timings.jsonl: wall time and peak RSS of stage runs, kept bounded.

`fang bench` reads only the latest entry per (stage, arguments), so older entries for the same key
are dropped on every write: the file grows with the number of distinct runs, not with reruns.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from .atomic import atomic_file


def _key(entry: dict) -> tuple:
    return entry.get("stage"), tuple(entry.get("args") or ())


def record_timing(log: str | os.PathLike, entry: dict) -> None:
    """Add `entry` to the log, replacing earlier entries of the same stage and arguments."""
    log = Path(log)
    # stages may run concurrently (dvc lanes): serialise the read-modify-write on a lock file
    with open(log.parent / f".{log.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kept: list[str] = []
        with contextlib.suppress(FileNotFoundError), open(log) as fh:
            for line in fh:
                try:
                    old = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a killed writer of the old append-only format
                if isinstance(old, dict) and _key(old) != _key(entry):
                    kept.append(json.dumps(old))
        with atomic_file(log) as fh:
            fh.writelines(line + "\n" for line in [*kept, json.dumps(entry)])
