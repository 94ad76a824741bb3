"""The package layout shows the architecture, and no import runs upward (README.md#project-layout)."""

from __future__ import annotations

import ast
from pathlib import Path

from test_dvc_deps import ROOT, _imports, _module_file

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


def _all_imports(path: Path) -> set[Path]:
    """Project modules `path` names in any import, those only for type checkers included."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found |= {f for f in map(_module_file, names) if f is not None and f != path}
    return found


def test_no_modules_import_each_other_in_a_circle():
    """Not even for type checking: a circle means neither module can be read, or moved, without the other."""
    graph = {path: {d for d in _all_imports(path) if _part(d) is not None}
             for path in sorted((ROOT / "fang").rglob("*.py")) if _part(path) is not None}
    done, on_path, circles = set(), [], []

    def visit(node: Path) -> None:
        if node in on_path:
            circles.append(" -> ".join(str(p.relative_to(ROOT)) for p in on_path[on_path.index(node):] + [node]))
            return
        if node in done:
            return
        on_path.append(node)
        for dep in sorted(graph.get(node, ())):
            visit(dep)
        on_path.pop()
        done.add(node)

    for node in graph:
        visit(node)
    assert not circles, "modules importing each other in a circle:\n" + "\n".join(circles)


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
