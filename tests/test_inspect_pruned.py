"""`fang inspect pruned`: kept structure and reconstruction error per layer from prune reports."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fang.core.errors import FangError
from fang.tools.inspection.cli import app
from fang.tools.inspection.pruned import read_runs


def _report(path, method, kv, ffn, err):
    layers = [{"layer": i, "kv_heads": k, "ffn": f, "relative_error": {"o_proj": e / 2, "down_proj": e}}
              for i, (k, f, e) in enumerate(zip(kv, ffn, err))]
    if method == "o_fang":
        for e in layers:
            e["own_cluster_weight"] = [0.5, 0.7]
    path.write_text(json.dumps({"method": method, "achieved_sparsity": 0.2, "options": {"allocation": "auto"},
                                "layers": layers}))
    return path


def test_pruned_view_lists_every_runs_structure(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    _report(sweep / "flap-0.2.prune.json", "flap", [1, 3], [1000, 1400], [0.2, 0.1])
    _report(sweep / "o_fang-0.2.prune.json", "o_fang", [3, 2], [1200, 1300], [0.05, 0.04])
    runs = read_runs(sorted(sweep.glob("*.prune.json")))
    assert [r.name for r in runs] == ["flap-0.2", "o_fang-0.2"]
    assert runs[1].column("own_cluster_weight") == [pytest.approx(0.6)] * 2
    result = CliRunner().invoke(app, ["pruned", "--artifacts", str(tmp_path), "--png", str(tmp_path / "png")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "1 / 1000 (0.200)" in result.output and "3 / 1200 (0.050)" in result.output
    assert (tmp_path / "png" / "pruned_structure.png").stat().st_size > 0


def test_pruned_view_errors(tmp_path):
    with pytest.raises(FangError, match="not found"):
        read_runs([tmp_path / "missing.prune.json"])
    bad = tmp_path / "bad.prune.json"
    bad.write_text("{}")
    with pytest.raises(FangError, match="not a prune report"):
        read_runs([bad])
