"""The package layout shows the architecture, and no import runs upward (fang/ README "Package layout")."""

from __future__ import annotations

import ast
from pathlib import Path

from test_dvc_deps import ROOT, _imports

# Bottom to top: a module may import its own part and the parts below it, never one above.
LAYERS = ("core", "model", "data", "analysis", "methods", "evaluation", "tools")


def _part(path: Path) -> str | None:
    rel = path.relative_to(ROOT).parts
    return rel[1] if rel[0] == "fang" and len(rel) > 2 else None


def test_every_module_lives_in_a_part():
    loose = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "fang").glob("*.py")
                   if p.name not in ("__init__.py", "cli.py"))
    assert not loose, f"modules outside the parts {LAYERS}: {loose}"
    parts = {p.name for p in (ROOT / "fang").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert parts == set(LAYERS)


def test_no_import_runs_upward():
    upward = []
    for path in sorted((ROOT / "fang").rglob("*.py")):
        part = _part(path)
        if part is None or "hf_code" in path.parts:
            continue
        for dep in _imports(path):
            target = _part(dep)
            rel = str(dep.relative_to(ROOT))
            if target is None:
                continue
            if LAYERS.index(target) > LAYERS.index(part):
                upward.append(f"{path.relative_to(ROOT)} ({part}) imports {rel} ({target})")
    assert not upward, "imports running upward:\n" + "\n".join(upward)


def test_the_registry_stays_declarative():
    """The method registry (names, the keys and artifacts each method reads) is a table in the core that
    params.yaml is validated against: it imports no pruning code."""
    tree = ast.parse((ROOT / "fang/core/registry.py").read_text())
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert mods <= {"__future__", "dataclasses", "errors"}, mods


def test_stages_import_no_other_stage():
    for path in sorted((ROOT / "stages").glob("*.py")):
        others = [str(d.relative_to(ROOT)) for d in _imports(path) if d.parent.name == "stages" and d.name != "__init__.py"]
        assert not others, f"{path.relative_to(ROOT)} imports {others}: move the shared code into fang/"
