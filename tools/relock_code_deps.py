"""Re-record a code-only change in the dvc.lock files, for stages that cannot be rerun on this machine.

    python tools/relock_code_deps.py --base REV [--check] [DVC_YAML ...]   (default: every dvc.yaml of the project)

`dvc commit` needs a stage's outputs in the workspace; a fresh machine without the study caches has only their
small JSONs, so a pure move of code (or a comment) would leave every study stage "changed" in `dvc status` for
good. For each locked stage this rewrites only its Python-source dependencies (`fang/**`, `stages/**`): the md5
and size of each to the file's current bytes, sorted by path as `dvc commit` writes them, adding a module dvc.yaml now lists
and dropping one it no longer lists. Outputs, data dependencies and params are left exactly as locked.

Only the change since `--base` (a git revision) is re-recorded: a stage is relocked only if every code dependency
in its lock matches that file at REV, i.e. the stage was current with the code at REV. A stage that was already
stale at REV (its outputs come from older code) is left alone and listed, since nothing shows that the code between
its run and REV left its outputs unchanged.

Use it only for a change shown not to move any output: rerun the stages on a tiny project before and after
(a harness that hashes every output) and rerun the main pipeline with `dvc repro`, which must keep its hashes.
`--check` lists the stages it would change and exits 1 if there are any. The lock is written atomically.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from ruamel.yaml import YAML

from fang.core.atomic import atomic_file

CODE_PREFIXES = ("fang/", "stages/")


def _entry(path: str) -> dict:
    data = Path(path).read_bytes()
    return {"path": path, "hash": "md5", "md5": hashlib.md5(data).hexdigest(), "size": len(data)}


def _is_code(path: str) -> bool:
    return path.startswith(CODE_PREFIXES) and path.endswith(".py")


def _md5_at(rev: str, path: str, cache: dict) -> str | None:
    """md5 of `path` as committed at `rev` (None when it did not exist there); `cache` keeps one git call per path."""
    if path not in cache:
        out = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, check=False)
        cache[path] = hashlib.md5(out.stdout).hexdigest() if out.returncode == 0 else None
    return cache[path]


def relock(repo, dvc_yaml: str, write: bool, base: str, at_base: dict) -> list[str]:
    """Stages of `dvc_yaml` whose locked code dependencies differ from the files (rewritten when `write`)."""
    from dvc.dependency.param import ParamsDependency

    lock_path = Path(dvc_yaml).with_name("dvc.lock")
    if not lock_path.is_file():
        return []
    stages = {s.name: s for s in repo.stage.collect(dvc_yaml) if getattr(s, "name", None)}
    yaml = YAML()
    lock = yaml.load(lock_path.read_text())
    changed = []
    for name, locked in lock["stages"].items():
        stage = stages.get(name)
        if stage is None or "deps" not in locked:
            continue
        wdir = Path(stage.wdir).resolve().relative_to(Path.cwd().resolve())
        old = {d["path"]: d for d in locked["deps"]}
        stale = [p for p, d in old.items() if _is_code(p) and d.get("md5") != _md5_at(base, p, at_base)]
        if stale:
            print(f"{dvc_yaml}:{name}: skipped (already stale at {base}: {', '.join(stale[:3])})", file=sys.stderr)
            continue
        new, ok = [], True
        for dep in stage.deps:
            if isinstance(dep, ParamsDependency):  # params are locked under "params", untouched here
                continue
            path = str(Path(os.path.normpath(wdir / dep.def_path)))
            if _is_code(path):
                entry = _entry(path)
                kept = old.get(path)
                new.append(kept if kept is not None and kept.get("md5") == entry["md5"] else entry)
            elif path in old:
                new.append(old[path])
            else:  # a data dependency the lock never saw: that needs a real run, not this tool
                ok = False
                break
        if not ok:
            print(f"{dvc_yaml}:{name}: skipped (a non-code dependency is not in the lock)", file=sys.stderr)
            continue
        new.sort(key=lambda d: d["path"])  # the order `dvc commit` writes them in
        if [dict(d) for d in new] != [dict(d) for d in locked["deps"]]:
            changed.append(name)
            locked["deps"] = new
    if write and changed:
        with atomic_file(lock_path) as fh:
            yaml.dump(lock, fh)
    return changed


def main(argv: list[str]) -> int:
    check = "--check" in argv
    argv = [a for a in argv if a != "--check"]
    if "--base" not in argv or argv.index("--base") + 1 >= len(argv):
        print("relock_code_deps: give --base REV, the commit whose code the locked stages were current with", file=sys.stderr)
        return 2
    i = argv.index("--base")
    base, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    files = argv or \
        ["dvc.yaml"] + sorted(str(p) for p in Path("studies").glob("*/dvc.yaml"))
    from dvc.repo import Repo

    repo, at_base, total = Repo("."), {}, 0
    for f in files:
        changed = relock(repo, f, write=not check, base=base, at_base=at_base)
        total += len(changed)
        if changed:
            print(f"{f}: {len(changed)} stage(s) {'would be ' if check else ''}relocked: "
                  + ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else ""))
    return 1 if check and total else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
