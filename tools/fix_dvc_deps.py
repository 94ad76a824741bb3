"""Rewrite the code deps of every dvc.yaml stage from what its stages/*.py module imports (transitively).

    python tools/fix_dvc_deps.py          # rewrite in place, print what changed
    python tools/fix_dvc_deps.py --check  # exit 1 if any stage's code deps differ

A stage's module is the one its `fang <command>` runs (stages/<command>.py). Its deps that are not
project modules (artifacts, data) are kept as they are, in their order;
project modules it still imports keep their place, modules it no longer imports are dropped, and
missing ones are appended in sorted order. The same rule as tests/test_dvc_deps.py (its
`transitive_imports`), so the test passes after a run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ruamel.yaml import YAML

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the rule lives with its test
from test_dvc_deps import NOT_OUTPUT_RELEVANT, ROOT, _pipelines, transitive_imports  # noqa: E402


def _is_module(dep: str) -> bool:
    return dep.endswith(".py") and dep.split("/")[0] in ("fang", "stages")


def fix(check: bool = False) -> list[str]:
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    changes = []
    for pipeline in _pipelines():
        doc = yaml.load(pipeline.read_text())
        changed = False
        for name, stage in doc["stages"].items():
            body = stage.get("do", stage)
            deps = body.get("deps")
            if not deps:
                continue
            here = (pipeline.parent / str(body.get("wdir", "."))).resolve()
            rel = lambda d: str((here / d).resolve().relative_to(ROOT))  # noqa: E731
            cmd = str(body.get("cmd", "")).split()
            module = f"stages/{cmd[1].replace('-', '_')}.py" if len(cmd) > 1 and cmd[0] == "fang" else None
            listed = [rel(d) for d in deps if "${" not in str(d) and rel(d).startswith("stages/") and rel(d).endswith(".py")]
            if module is not None and not (ROOT / module).exists():
                # a command that is not one stage module (a second command of one, or `fang recipe-analysis`,
                # which runs several): the stage modules it lists, as tests/test_dvc_deps.py reads them
                modules = [m for m in listed if (ROOT / m).exists()]
            else:
                modules = [module] if module is not None and (ROOT / module).exists() else []
            if not modules:
                continue
            needed = set().union(*(transitive_imports(ROOT / m) | {m} for m in modules)) - NOT_OUTPUT_RELEVANT
            kept = [d for d in deps if not (_is_module(rel(d)) if "${" not in str(d) else False) or rel(d) in needed]
            have = {rel(d) for d in kept if "${" not in str(d)}
            added = sorted(needed - have)
            new = kept + [os.path.relpath(ROOT / a, here) for a in added]  # deps are relative to the stage's wdir
            if [str(d) for d in new] != [str(d) for d in deps]:
                gone = sorted({rel(d) for d in deps if "${" not in str(d)} - {rel(d) for d in new if "${" not in str(d)})
                changes.append(f"{pipeline.relative_to(ROOT)}:{name}: +{added} -{gone}")
                if not check:
                    deps.clear()
                    deps.extend(new)
                    changed = True
        if changed:
            with open(pipeline, "w") as fh:
                yaml.dump(doc, fh)
    return changes


if __name__ == "__main__":
    check = "--check" in sys.argv[1:]
    changes = fix(check)
    print("\n".join(changes) or "all stages list exactly the modules they import")
    sys.exit(1 if check and changes else 0)
