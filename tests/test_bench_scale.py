"""fang bench --parts scale: the shapes' counts, the fits recover known coefficients, the estimate arithmetic, and
the part end to end on two tiny shapes (real stages in forked processes, scale.json and the docs block)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fang.core.errors import FangError
from fang.tools.bench import scale

ROOT = Path(__file__).resolve().parents[1]


def test_llama2_7b_shape_counts_its_released_parameters():
    d = scale.shape_dims(scale.SHAPES["llama2-7b"], 32, 1, 1, vocab=32000)
    norms = (2 * 32 + 1) * 4096  # two RMSNorms per block and the final one (not in block_params)
    assert 32 * d["block_params"] + 2 * 32000 * 4096 + norms == 6_738_415_616  # LLaMA-2-7B as released
    f = scale.features(d)
    assert f["fwd_flops"] == 2 * 32 * 1 * d["block_params"] + 2 * 32 * 1 * 1 * 4096
    assert f["cubic_f_flops"] == 32 * 11008 ** 3 and f["gram_h_flops"] == 2 * 32 * 4096 ** 2
    untied = scale.features(scale.shape_dims(scale.SHAPES["llama2-7b"], 32, 1, 1, vocab=32000, tied=False))
    assert untied["weight_bytes"] == 4 * (6_738_415_616 - norms)  # float32 bytes of every matrix


def test_bad_shapes_and_options_are_one_line_errors(tmp_path):
    with pytest.raises(FangError, match="split into heads"):
        scale.shape_dims({"hidden_size": 100, "intermediate_size": 10, "n_heads": 3, "n_kv_heads": 1}, 1, 1, 1)
    with pytest.raises(FangError, match="scale-plan"):
        scale.run_scale(ROOT / "params.yaml", tmp_path, plan="huge")
    with pytest.raises(FangError, match="scale-jobs"):
        scale.run_scale(ROOT / "params.yaml", tmp_path, plan="tiny", jobs=0)


def _rows(truth: dict[str, float]) -> list[dict]:
    rows = []
    for i, (shape, n, b, L) in enumerate([("smollm2-135m", 2, 8, 128), ("smollm2-360m", 2, 8, 128),
                                          ("tinyllama-1.1b", 2, 8, 128), ("llama2-7b", 2, 8, 128),
                                          ("smollm2-360m", 8, 8, 128), ("smollm2-360m", 2, 24, 512),
                                          ("tiny", 4, 4, 32)]):
        feats = scale.features(scale.shape_dims(scale.SHAPES[shape], n, b, L))
        rows.append({"config": f"c{i}", "features": feats, "y": sum(c * feats[t] for t, c in truth.items())})
    return rows


def test_fit_recovers_known_coefficients():
    # 25 GFLOP/s on the forward, 5 GFLOP/s on the Gram terms, 1 GFLOP/s on the factorisations, 2 s fixed
    truth = {"fwd_flops": 1 / 25e9, "gram_f_flops": 1 / 5e9, "cubic_f_flops": 1 / 1e9, "const": 2.0}
    fit = scale.fit_terms(_rows(truth), tuple(truth), "y")
    for t, c in truth.items():
        assert fit["coefficients"][t] == pytest.approx(c, rel=1e-6)
    assert fit["rms_relative_residual"] < 1e-9 and fit["n_points"] == 7
    # a term the data does not need gets no weight, and the others still come out
    fit = scale.fit_terms(_rows(truth), (*truth, "layer_tokens"), "y")
    assert fit["coefficients"]["layer_tokens"] == pytest.approx(0, abs=1e-12)
    assert fit["coefficients"]["fwd_flops"] == pytest.approx(truth["fwd_flops"], rel=1e-6)


def test_fit_with_noise_reports_its_residuals():
    truth = {"fwd_flops": 1 / 25e9, "const": 2.0}
    rows = _rows(truth)
    for i, r in enumerate(rows):
        r["y"] *= 1.1 if i % 2 else 0.9
    fit = scale.fit_terms(rows, tuple(truth), "y")
    assert 0.05 < fit["rms_relative_residual"] < 0.15
    assert fit["max_abs_relative_residual"] == pytest.approx(max(abs(p["relative_residual"]) for p in fit["points"]))
    assert all(c >= 0 for c in fit["coefficients"].values())


def test_estimate_arithmetic_on_a_toy_case():
    fit = {"coefficients": {"fwd_flops": 1e-10, "weight_bytes": 1e-9, "const": 3.0}}
    feats = {"fwd_flops": 2e12, "weight_bytes": 4e9, "const": 1.0}
    g = scale.gpu_seconds(fit, feats, cpu_gemm_flops_s=50e9, peak_flops_s=100e12, efficiency=0.5)
    # 200 CPU s of forward at 50 GFLOP/s is 1e13 GEMM-equivalent FLOPs: 0.2 s at 50 TFLOP/s; 4 s + 3 s stay as they are
    assert g["cpu_seconds"] == pytest.approx(200 + 4 + 3)
    assert g["gemm_equivalent_flops"] == pytest.approx(1e13)
    assert g["gpu_seconds"] == pytest.approx(0.2 + 7)
    # through `estimate`: the stage sums, the dtype picks the peak, the pipeline is every stage but flap's prune
    fits = {"capture": {"coefficients": {"fwd_flops": 1e-10}}, "prune:o_fang": {"coefficients": {"const": 5.0}},
            "prune:flap": {"coefficients": {"const": 7.0}}}
    rss = {"capture": {"coefficients": {"weight_bytes": 1.0}}}
    target = {"toy": {"shape": "tiny", "n_layers": 2, "vocab_size": 100}}
    (e,) = scale.estimate(fits, rss, 50e9, "bfloat16", efficiencies=(0.5,), targets=target, calibrations=[("c", 2, 8)])
    x = e["features"]["fwd_flops"]
    assert e["pipeline_stages"] == ["capture", "prune:o_fang"]
    assert e["pipeline_gpu_seconds"]["0.5"] == pytest.approx(x * 1e-10 * 50e9 / (scale.H100["bf16_flops"] * 0.5) + 5)
    assert e["stages"]["capture"]["host_rss_bytes"] == pytest.approx(e["features"]["weight_bytes"])


def test_scale_part_end_to_end_on_two_tiny_shapes(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    page = tmp_path / "results.md"
    page.write_text("# results\n\n<!-- scale:start -->\nstale block\n<!-- scale:end -->\ntail\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FANG_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "fang.cli", "bench", "--parts", "scale", "--scale-plan", "tiny",
                           "--scale-jobs", "2", "--results", str(page)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads((tmp_path / "artifacts" / "bench" / "scale.json").read_text())
    assert {"format", "plan", "configs", "fits", "estimates", "gemm", "load_avg_before", "machine", "time"} <= set(out)
    assert [c["shape"] for c in out["configs"]] == ["tiny", "tiny-wide"]
    for c in out["configs"]:
        assert set(c["stages"]) == set(scale.STAGES)
        for r in c["stages"].values():
            assert r["cpu_s"] > 0 and r["wall_s"] > 0 and r["peak_rss_kib"] >= r["rss_before_kib"] > 0
    assert set(out["fits"]["float32"]["cpu"]) == set(scale.STAGES)
    models = {(e["model"], e["calibration"]) for e in out["estimates"]["float32"]}
    assert ("LLaMA-2-70B", "paper 128 × 2048") in models and len(models) == 4
    text = page.read_text()
    assert "stale block" not in text and text.endswith("<!-- scale:end -->\ntail\n") and "LLaMA-2-7B" in text
    assert not any((tmp_path / "artifacts" / "bench" / "scale_work").iterdir())  # scratch projects removed
    # refit: the same measurements, fitted again, without running anything
    proc = subprocess.run([sys.executable, "-m", "fang.cli", "bench", "--parts", "scale", "--scale-refit"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((tmp_path / "artifacts" / "bench" / "scale.json").read_text())
    assert again["configs"] == out["configs"] and again["fits"] == out["fits"]
