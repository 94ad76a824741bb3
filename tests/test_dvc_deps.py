"""Every DVC stage depends on every project module its command imports, so a code change can never
leave a stale result that `dvc status` calls up to date."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# modules whose change cannot alter a stage's output: command-line wiring, progress display, error messages,
# the output-path guard (it refuses a path or takes a lock before any work, never changes what is written)
NOT_OUTPUT_RELEVANT = {"fang/cli.py", "fang/core/progress.py", "fang/core/errors.py", "fang/core/outputs.py",
                       "stages/__init__.py", "fang/__init__.py"}
# and every package __init__.py that holds only its docstring (fang/core/__init__.py, ...): importing it runs nothing


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in ("fang", "stages"):
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


# The driver imports each registered method's module by name (`fang.methods.driver.method_class`), so
# a module that resolves methods by name depends on every module the registry names.
REGISTRY = ROOT / "fang" / "core" / "registry.py"
RESOLVES_METHODS = {ROOT / "fang" / "methods" / "driver.py"}


def registered_method_modules() -> set[Path]:
    """The files of every method in fang/core/registry.py (its `MethodSpec("name", "module:Class", ...)` lines)."""
    found = set()
    for node in ast.walk(ast.parse(REGISTRY.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "MethodSpec" and len(node.args) > 1:
            found.add(ROOT / "fang" / "methods" / f"{node.args[1].value.partition(':')[0]}.py")
    assert found and all(f.exists() for f in found), f"registry names missing modules: {sorted(map(str, found))}"
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node, except inside `if TYPE_CHECKING:` (imports there only feed type checkers)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", None)) == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _imports(path: Path) -> set[Path]:
    """Project modules `path` imports (absolute `fang.x`, `stages.x` and relative `.x` imports, and the
    registered methods for a module that resolves them by name)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in _runtime_nodes(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for name in names:
            f = _module_file(name)
            if f is not None and f != path:
                found.add(f)
    if path in RESOLVES_METHODS:
        found |= registered_method_modules() - {path}
    return found


def _docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def transitive_imports(path: Path) -> set[str]:
    seen: set[Path] = set()
    todo = [path]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(_imports(p) - seen)
    return {str(p.relative_to(ROOT)) for p in seen if not _docstring_only(p)}


def _pipelines() -> list[Path]:
    return [p for p in ROOT.rglob("dvc.yaml") if ".dvc" not in p.parts and "artifacts" not in p.parts]


def _stage_code_deps() -> list[tuple[str, str, set[str], set[str]]]:
    """(pipeline, stage, project modules it imports, project files it lists as deps)."""
    rows = []
    for pipeline in _pipelines():
        stages = yaml.safe_load(pipeline.read_text())["stages"]
        for name, stage in stages.items():
            body = stage.get("do", stage)
            here = (pipeline.parent / str(body.get("wdir", "."))).resolve()  # deps are relative to the stage's wdir
            deps = {str((here / d).resolve().relative_to(ROOT)) for d in body.get("deps", []) if "${" not in str(d)
                    and (here / d).resolve().is_relative_to(ROOT)}
            stage_modules = [d for d in deps if d.startswith("stages/") and d.endswith(".py")]
            if not stage_modules:
                continue
            needed = set()
            for m in stage_modules:
                needed |= transitive_imports(ROOT / m)
            rows.append((str(pipeline.relative_to(ROOT)), name, needed - NOT_OUTPUT_RELEVANT, deps))
    return rows


def test_every_stage_lists_its_stage_module():
    # a stage without its stages/*.py dep would escape the check below
    for pipeline in _pipelines():
        for name, stage in yaml.safe_load(pipeline.read_text())["stages"].items():
            body = stage.get("do", stage)
            cmd = str(body.get("cmd", ""))
            if cmd.startswith("fang "):
                deps = [str(d) for d in body.get("deps", [])]
                assert any(d.endswith(".py") and "stages/" in d for d in deps), (
                    f"{pipeline.relative_to(ROOT)}: stage {name} runs `{cmd.split()[0]} {cmd.split()[1]}` "
                    "but lists no stages/*.py module among its deps"
                )


def test_every_stage_depends_on_every_module_it_imports():
    rows = _stage_code_deps()
    assert rows, "no stage with a stages/*.py dependency found"
    missing = {f"{pl}:{stage}": sorted(needed - deps) for pl, stage, needed, deps in rows if needed - deps}
    assert not missing, f"dvc.yaml stages miss deps on modules they import: {missing}"


def test_the_driver_depends_on_every_registered_method():
    got = transitive_imports(ROOT / "stages" / "prune.py")
    assert {str(f.relative_to(ROOT)) for f in registered_method_modules()} <= got
    assert "fang/methods/o_fang.py" in got and "fang/methods/function_aware.py" in got


def test_transitive_imports_follow_relative_imports():
    got = transitive_imports(ROOT / "stages" / "prune.py")
    assert {"fang/methods/driver.py", "fang/methods/flap.py", "fang/methods/obc.py", "fang/model/shrink.py"} <= got
