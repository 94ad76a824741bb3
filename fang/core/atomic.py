"""Atomic writes: an interrupted stage leaves no half-written artifact a later stage would trust.

Everything is written to a temporary sibling `.<name>.tmp-<pid>` first and renamed into place only
when complete. An error or Ctrl-C/SIGTERM removes the temp; a run killed outright (SIGKILL, OOM)
cannot, so the next write of the same output removes temps whose writing process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(final: str | os.PathLike) -> list[Path]:
    """Delete the temps of `final` left by runs that were killed (their pid is gone); return them.

    Names of the older `.tmp-<random>` form are stale too: no running fang writes them any more.
    """
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    prefix = f".{final.name}.tmp-"
    for tmp in final.parent.iterdir():
        if not tmp.name.startswith(prefix):
            continue
        owner = tmp.name[len(prefix):]
        if owner.isdigit() and (int(owner) == os.getpid() or _alive(int(owner))):
            continue
        with contextlib.suppress(FileNotFoundError):
            _remove(tmp)
        removed.append(tmp)
    return removed


def _temp_path(final: Path) -> Path:
    remove_stale_temps(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    _remove(tmp)  # this process's own leftover (an earlier failed write of the same output)
    return tmp


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp directory; on success it replaces `final`, on error it is deleted."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove(final)
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temp file beside `final` for writing; rename over `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(final)
    try:
        with open(tmp, mode) as fh:
            yield fh
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.replace(tmp, final)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    from .errors import FangError

    path = Path(path)
    if not path.exists():
        raise FangError(f"missing file: {path} (run the stage that produces it first, e.g. `dvc repro`)")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FangError(f"{path} is not valid JSON ({exc}): rerun the stage that writes it") from None
