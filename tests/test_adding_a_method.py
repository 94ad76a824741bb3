"""The "Adding a method" example, taken from docs/methods.md: one module plus one registry line is a
method the driver, the variants, the manifests and the report all accept."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import torch

from conftest import assert_reloads_identically, captured, tiny_model

PAGE = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def _example() -> tuple[str, str]:
    text = PAGE.read_text()
    section = text[text.index("## Adding a method"):]
    end = section.find("\n## ", 3)
    section = section if end < 0 else section[:end]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the section holds the module and its registry line"
    return blocks[0], blocks[1].strip()


def test_the_documented_example_method_is_one_module_and_one_registry_line(calib, tmp_path, monkeypatch):
    from fang.core.choices import parse_variant
    from fang.evaluation.report import comparison_pairs
    from fang.methods import inputs as mi
    from fang.methods.driver import prune_model
    from fang.core.registry import REGISTRY, MethodSpec

    module_src, line = _example()
    path = tmp_path / "l1.py"
    path.write_text(module_src)
    spec = importlib.util.spec_from_file_location("fang.methods.l1", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "fang.methods.l1", module)
    spec.loader.exec_module(module)  # as if saved as fang/methods/l1.py
    entry = eval(line.rstrip(","), {"MethodSpec": MethodSpec})
    monkeypatch.setitem(REGISTRY, entry.name, entry)  # as if the line were in REGISTRY
    monkeypatch.setitem(mi.READS, entry.name, entry.reads)  # the manifests' table, built from REGISTRY at import

    model, dense = tiny_model(6, 3, layers=2), tiny_model(6, 3, layers=2)
    cap = captured(model, calib, tmp_path)
    report = prune_model(model, cap, "l1", 0.3)
    for li, layer in enumerate(dense.model.layers):
        l1 = layer.mlp.down_proj.weight.detach().abs().sum(0)
        top = torch.sort(torch.argsort(l1, descending=True)[: report.layers[li]["ffn"]]).values
        assert torch.equal(model.model.layers[li].mlp.down_proj.weight, layer.mlp.down_proj.weight[:, top])
    assert_reloads_identically(model, calib, tmp_path)

    assert parse_variant("l1+fc").allocation == "fc"
    assert mi.keys_read("l1") == ("gqa",) and comparison_pairs(["magnitude", "l1"]) == [("l1", "magnitude")]
