"""Where a fang command may write: one guard every writing command calls before any work.

A mistyped output path must not cost the user their project. `fang prune --out .` used to empty the
project folder, `--out artifacts` to replace every artifact by a model, `--out artifacts/model` the
dense model, and `fang evaluate --out artifacts/pruned/config.json` a model's config. `guard_output`
refuses such a path before anything is loaded or computed, with one line naming it:

- the project folder or a parent of it, and `artifacts/` itself;
- anything another pipeline stage owns (the main pipeline's artifacts, every `outs` of dvc.yaml and
  studies/*/dvc.yaml) or the command's own inputs: the path itself, a folder holding them, or a path
  inside them. The exact output of a stage that runs the same command stays allowed (reruns);
- an existing file where a folder is written, or the reverse;
- an existing path that is not a previous output of the same kind. fang's outputs are recognised
  by what they already hold (a pruned model's structure.json, a metrics file's keys, GGUF magic), so
  no marker file is added and no output changes its bytes (or its DVC hash);
- a place that cannot be written (probed by creating a file there, which also catches read-only
  mounts, /proc and immutable folders that permission bits do not show).

It then takes a lock `<output>.lock` holding the pid, so a second writer of the same output fails at
once instead of both running and the last one silently winning. The lock is released at exit (also
on Ctrl-C/SIGTERM, which unwind as KeyboardInterrupt); a lock whose pid is gone (SIGKILL, OOM) is
stale and taken over.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from . import paths
from .atomic import _alive
from .errors import FangError, require


@dataclass(frozen=True)
class Kind:
    """What one command writes: the command, a folder or a file, and how to recognise a previous one."""

    command: str
    label: str
    folder: bool
    recognise: Callable[[Path], bool]


def _json_with(*keys: str) -> Callable[[Path], bool]:
    def recognise(path: Path) -> bool:
        try:
            with open(path) as fh:
                obj = json.load(fh)
        except (OSError, ValueError):
            return False
        return isinstance(obj, dict) and all(k in obj for k in keys)
    return recognise


def _magic(prefix: bytes) -> Callable[[Path], bool]:
    def recognise(path: Path) -> bool:
        try:
            with open(path, "rb") as fh:
                return fh.read(len(prefix)) == prefix
        except OSError:
            return False
    return recognise


def _pruned_model(path: Path) -> bool:
    # save_pruned writes structure.json beside the dense-style config.json; nothing else writes both
    return (path / "structure.json").is_file() and (path / "config.json").is_file()


def _only_plots(path: Path) -> bool:
    # `--png DIR` adds plots to DIR: an empty folder or one holding only plots (a previous --png) is fine
    return all(p.is_file() and p.suffix == ".png" for p in path.iterdir())


KINDS: dict[str, Kind] = {
    "pruned_model": Kind("prune", "a pruned model (structure.json + config.json)", True, _pruned_model),
    "prune_report": Kind("prune", "a prune report", False, _json_with("method", "target_sparsity", "achieved_sparsity")),
    "metrics": Kind("evaluate", "an evaluation's metrics JSON", False, _json_with("model", "ppl", "tasks")),
    "method_inputs": Kind("method-inputs", "a method-inputs manifest", False, _json_with("method", "params", "artifacts")),
    "attribution": Kind("attribute-removed", "an attribute-removed JSON", False, _json_with("model", "removed_fraction")),
    "precision": Kind("compare-precision", "a precision comparison JSON", False, _json_with("comparisons")),
    "question_split": Kind("recipe-split", "a question split JSON", False, _json_with("seed", "halves")),
    "recipe_search": Kind("recipe-select", "a recipe search JSON", False, _json_with("table", "choice")),
    "recipe_confirmation": Kind("recipe-confirm", "a recipe confirmation JSON", False, _json_with("recipe", "verdicts")),
    "gguf": Kind("export", "a GGUF file", False, _magic(b"GGUF")),
    "png": Kind("inspect", "a folder of PNG plots", True, _only_plots),
}

# The main pipeline's artifacts and the command writing each, known without reading dvc.yaml (a
# project may have none). `None`: a folder of several stages' outputs, owned as a whole.
_BUILTIN: tuple[tuple[Path, str | None], ...] = (
    (paths.MODEL, "fetch-model"), (paths.DATA, "fetch-data"), (paths.CALIB, "calibrate"),
    (paths.CAPTURE, "capture"), (paths.CLUSTER, "cluster"), (paths.TAYLOR, "taylor"), (paths.GROUPS, "group"),
    (paths.ALLOCATE, "allocate"), (paths.BLOCK_SPARSITY, "allocate"), (paths.PRUNED, "prune"),
    (paths.METRICS / "prune.json", "prune"), (paths.METRICS / "cluster.json", "cluster"),
    (paths.METRICS / "groups.json", "group"), (paths.ICA, "ica"), (paths.GPRUNE, "gprune-modules"),
    (paths.ATTRIBUTION, "attribute"), (paths.ATTRIBUTION_SUMMARY, "attribute"), (paths.BIAS, None),
)

_TEMPLATE = re.compile(r"\$\{([^}]+)\}")


def _lookup(name: str, context: dict) -> object:
    value: object = context
    for part in name.strip().split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(name)
        value = value[part]
    return value


def _render(text: str, context: dict) -> object:
    whole = _TEMPLATE.fullmatch(text.strip())
    if whole:  # `foreach: ${sweep.methods}`: the list itself
        return _lookup(whole.group(1), context)
    return _TEMPLATE.sub(lambda m: str(_lookup(m.group(1), context)), text)


def _contexts(stage: dict, context: dict) -> list[tuple[dict, dict]]:
    """(body, context) of every stage a `foreach`/`matrix` stage expands to (DVC's templating, the part we use)."""
    if "foreach" in stage:
        items = stage["foreach"]
        items = _render(items, context) if isinstance(items, str) else items
        if isinstance(items, dict):  # `foreach: {dense: {...}, pruned: {...}}`: ${key} and ${item}
            return [(stage.get("do", {}), {**context, "key": k, "item": v}) for k, v in items.items()]
        return [(stage.get("do", {}), {**context, "item": item}) for item in (items or [])]
    if "matrix" in stage:
        keys = list(stage["matrix"])
        values = [_render(v, context) if isinstance(v, str) else v for v in stage["matrix"].values()]
        return [(stage, {**context, "item": dict(zip(keys, combo))}) for combo in itertools.product(*values)]
    return [(stage, context)]


def stage_outputs(root: Path) -> list[tuple[Path, str, str | None]]:
    """(absolute path, stage, fang command) of every output the project's pipelines declare.

    Reads dvc.yaml and studies/*/dvc.yaml with params.yaml for their `${...}`; a file that cannot be
    read adds nothing (the built-in list of the main pipeline's artifacts still applies).
    """
    import yaml

    found: list[tuple[Path, str, str | None]] = [(root / p, "", cmd) for p, cmd in _BUILTIN]
    try:
        params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        params = {}
    for pipeline in [root / "dvc.yaml", *sorted(root.glob("studies/*/dvc.yaml"))]:
        try:
            doc = yaml.safe_load(pipeline.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(doc, dict):
            continue
        context = {**(params if isinstance(params, dict) else {})}
        for v in doc.get("vars") or []:
            if isinstance(v, dict):
                context.update(v)
        for name, stage in (doc.get("stages") or {}).items():
            try:  # a stage this reading of DVC's templating cannot expand adds nothing; the others still count
                for body, ctx in _contexts(stage, context):
                    words = shlex.split(str(_render(str(body.get("cmd", "")), ctx)))
                    command = words[1] if len(words) > 1 and words[0] == "fang" else None
                    wdir = Path(os.path.normpath(pipeline.parent / str(body.get("wdir", "."))))  # outs are relative to it
                    # metrics and plots are outputs too (evaluations, cluster.json are declared as metrics)
                    for out in [*(body.get("outs") or []), *(body.get("metrics") or []), *(body.get("plots") or [])]:
                        out = next(iter(out)) if isinstance(out, dict) else out
                        found.append((wdir / str(_render(str(out), ctx)), name, command))
            except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):
                continue
    return found


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def guard_output(path: str | os.PathLike | None, kind: str, option: str,
                 inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse `path` as an output of `kind` (a KINDS key) unless it is safe; then lock it. One line per refusal.

    `option` names the argument in messages (e.g. "--out"); `inputs` are what the command reads
    (its model), which it must not overwrite. Returns the path, unchanged, for the caller to use.
    """
    k = KINDS[kind]
    require(path is not None and str(path).strip() != "", f"{option} is empty: give a path to write")
    given = Path(path)
    root = Path.cwd().resolve()
    here = {Path(os.path.abspath(given)), given.resolve()}  # as written and with symlinks followed
    owned = stage_outputs(root)
    for p in here:
        require(not _inside(root, p), f"{option} {path} is the project folder or a parent of it: writing there "
                                      "would replace the whole project; give a new path")
        require(p != root / paths.ARTIFACTS, f"{option} {path} is the artifacts folder itself: writing there would "
                                             "replace every artifact; give a new path inside it")
        for i in inputs:
            i_abs = Path(i).resolve()
            require(not (_inside(p, i_abs) or _inside(i_abs, p)),
                    f"{option} {path} overlaps {i}, which this command reads: writing there would destroy its "
                    "input; give another path")
        for out, stage, command in owned:
            if p == out and command == k.command:
                continue  # this command's own output in some stage: a rerun
            owner = (f"stage '{stage}'" + (f" (`fang {command}`)" if command else "") if stage
                     else f"`fang {command}`" if command else "the bias study")
            require(not _inside(out, p), f"{option} {path} is or holds {out.relative_to(root)}, the output of "
                                         f"{owner}: writing there would destroy it; give another path")
            require(not _inside(p, out), f"{option} {path} is inside {out.relative_to(root)}, the output of "
                                         f"{owner}: give a path outside it")
    if given.exists() or given.is_symlink():
        if k.folder:
            require(given.is_dir(), f"{option} {path} is an existing file, and `fang {k.command}` writes a folder "
                                    "there: give another path")
        else:
            require(not given.is_dir(), f"{option} {path} is an existing folder, and `fang {k.command}` writes a file "
                                        "there: give a file path")
        require(k.recognise(given), f"{option} {path} exists and is not {k.label} written by `fang {k.command}`: "
                                    "fang replaces only its own outputs; move it away or give another path")
    _probe_writable(given, option)
    given.parent.mkdir(parents=True, exist_ok=True)
    take_lock(given)
    return given


def _probe_writable(path: Path, option: str) -> None:
    """Create and remove a file where `path` will be written: permission bits miss read-only and immutable places."""
    folder = Path(os.path.abspath(path)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    require(folder.is_dir(), f"{option} {path}: {folder} is a file, not a folder that could hold it")
    probe = folder / f".fang-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise FangError(f"{option} {path}: cannot write in {folder} ({exc.strerror})") from None


_HELD: set[Path] = set()


def take_lock(target: str | os.PathLike) -> Path:
    """Create `<target>.lock` holding this pid (O_CREAT|O_EXCL); refuse if a live process holds it."""
    target = Path(target)
    lock = Path(os.path.abspath(target.parent / f"{target.name}.lock"))  # released at exit, whatever the cwd then
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder == os.getpid():
                return lock  # this process already writes it (a stage run twice in one process, e.g. tests)
            if holder is not None and _alive(holder):
                raise FangError(f"{target} is being written by another fang (pid {holder}; lock {lock}): "
                                "wait for it to finish or stop it") from None
            if holder is None and _fresh(lock):
                raise FangError(f"{target} is being written by another fang (lock {lock} just taken): "
                                "wait for it to finish or stop it") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)  # stale: its writer was killed (SIGKILL, OOM) before it could remove it
            continue
        except OSError as exc:
            raise FangError(f"cannot write beside {target} ({exc.strerror})") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        if not _HELD:
            atexit.register(release_locks)
        _HELD.add(lock)
        return lock
    raise FangError(f"{target}: could not take the lock {lock} (another fang keeps taking it)")


def _holder(lock: Path) -> int | None:
    try:
        text = lock.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _fresh(lock: Path) -> bool:
    # a lock seen between its creation and its pid being written: a live writer, not a stale one
    with contextlib.suppress(OSError):
        return time.time() - lock.stat().st_mtime < 5
    return False


def release_locks() -> None:
    """Remove the locks this process holds (at exit; a stage run in-process may call it itself)."""
    for lock in list(_HELD):
        if _holder(lock) == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(lock)
        _HELD.discard(lock)
