"""model.compute_dtype: every block pass in bfloat16 against the same pass in float32, on tiny random LLaMA models.

What must hold: the statistics each pass hands on are float32/float64 whatever the blocks run in, and
close to the float32 run's; a prune in bfloat16 keeps mostly the same units and gives a model that
saves, reloads and runs. Tolerances: bfloat16 keeps 8 significant bits (unit round-off 2^-9 = 0.2%);
every block rounds its weights, each matmul's inputs and the residual stream, and the error compounds
over the 3 blocks here. Measured on these models: 0.4-0.9% normwise for the capture moments, 1.2% for
the Taylor scores and cluster centres, 0.2% for the block sensitivity, 0.02% for FC. The bounds below are 3% (moments, scores, per-article sums) and 0.5%
(FC): a few times what rounding gives, and far below what a wrong statistic gives (a score computed
from bfloat16 sums over thousands of tokens, or a missing cast, is off by tens of percent or fails).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_reloads_identically, stage_project, tiny_model
from helpers_tokenizer import tiny_tokenizer
from fang.analysis.attribute import stream_activations
from fang.analysis.capture import capture_features, open_capture
from fang.analysis.taylor import taylor_scores
from fang.core import device as device_mod
from fang.core.errors import FangError
from fang.core.params import COMPUTE_DTYPES, ModelParams, parse_block
from fang.methods import obc
from fang.methods.driver import PruneOptions, prune_model
from fang.methods.stats import InputStats
from fang.model.mlp_stream import stream_mlp
from fang.model.offload import load_dense_offloaded
from test_fang_prune import make_fang_inputs

N_LAYERS = 3
DTYPES = (torch.float32, torch.bfloat16)
STAT_TOL = 0.03  # normwise relative difference of a bfloat16 run's statistics from the float32 run's (see above)


def _model(dtype: torch.dtype):
    """The same 3-block GQA model (6 query / 3 KV heads) with its parameters in `dtype`, as load_dense(dtype=...)
    gives it: the rotary inv_freq buffers stay float32 (`.to(dtype)` would round them too)."""
    model = tiny_model(6, 3, layers=N_LAYERS)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def _calib() -> torch.Tensor:
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(5))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    """{dtype: capture store} of the same model and calibration, blocks in float32 and in bfloat16."""
    tmp = tmp_path_factory.mktemp("compute_dtype")
    out = {}
    for dt in DTYPES:
        path = tmp / f"{str(dt)[6:]}.zarr"
        capture_features(_model(dt), _calib(), path, batch_size=4, dtype="float32", pca_dim=4,
                         keep=("ffn_in", "down_in"))
        out[dt] = open_capture(path)
    return out


# ---------------------------------------------------------------------------------------------- resolver


def test_resolver_names_and_auto_on_cpu():
    assert device_mod.COMPUTE_DTYPES == COMPUTE_DTYPES  # params.py keeps its own copy (no torch import there)
    assert device_mod.resolve_compute_dtype("auto", "cpu") == "float32"
    for name in ("float32", "bfloat16", "float16"):
        assert device_mod.resolve_compute_dtype(name, torch.device("cpu")) == name


def test_resolver_errors_are_one_line():
    with pytest.raises(FangError, match=r"model.compute_dtype='half': use one of auto, float32, bfloat16, float16") as e:
        device_mod.resolve_compute_dtype("half", "cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(FangError, match="model.compute_dtype='fp16'"):
        parse_block("model", {"compute_dtype": "fp16"}, ModelParams)
    assert parse_block("model", {}, ModelParams).compute_dtype == "auto"


def test_resolver_on_a_gpu_with_and_without_bfloat16(monkeypatch):
    """auto is bfloat16 on CUDA, float16 on a GPU without bfloat16, where bfloat16 asked for is an error
    (torch.device("cuda") needs no GPU to exist; only is_bf16_supported is asked)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device_mod.resolve_compute_dtype("auto", "cuda") == "bfloat16"
    assert device_mod.resolve_compute_dtype("float32", "cuda:0") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert device_mod.resolve_compute_dtype("auto", "cuda") == "float16"
    with pytest.raises(FangError, match="no bfloat16 support: use float16 or auto"):
        device_mod.resolve_compute_dtype("bfloat16", "cuda")


def test_float16_runs_forward_and_backward_on_cpu():
    """Why float16 on CPU is allowed: the hardest pass (taylor: forward and backward per block) runs in it."""
    clusters = torch.zeros(N_LAYERS, 4 * 16, dtype=torch.long)
    res = taylor_scores(_model(torch.float16), _calib()[:4, :16], clusters, 1, batch_size=4)
    ref = taylor_scores(_model(torch.float32), _calib()[:4, :16], clusters, 1, batch_size=4)
    assert res["scores"].dtype == torch.float32 and torch.isfinite(res["scores"]).all()
    assert _rel(res["scores"], ref["scores"]) < STAT_TOL  # float16 keeps 11 bits: closer than bfloat16


# ---------------------------------------------------------------------------------------------- passes


def test_capture_statistics_are_float64_and_close(captures):
    f32, bf16 = captures[torch.float32], captures[torch.bfloat16]
    # float32 is not recorded: a float32 store keeps the bytes it had before model.compute_dtype existed
    assert bf16.attrs["compute_dtype"] == "bfloat16" and "compute_dtype" not in f32.attrs
    for name in ("o_proj_in_mean", "o_proj_in_var", "down_in_mean", "down_in_var"):
        assert bf16[name].dtype == np.float64
        assert _rel(bf16[name][:], f32[name][:]) < STAT_TOL, name
    assert _rel(bf16["fc"][:], f32["fc"][:]) < 0.005
    # the stored per-token features are in the store dtype, not the compute dtype
    assert bf16["down_in"].dtype == np.float32 and bf16["ffn_proj"].dtype == np.float32
    assert _rel(bf16["down_in"][:], f32["down_in"][:]) < STAT_TOL


def test_taylor_scores_are_float32_and_close():
    ids = _calib()
    clusters = torch.randint(0, 3, (N_LAYERS, ids.numel()), generator=torch.Generator().manual_seed(1))
    res = {dt: taylor_scores(_model(dt), ids, clusters, 3, batch_size=4) for dt in DTYPES}
    f32, bf16 = res[torch.float32], res[torch.bfloat16]
    for name in ("scores", "block_sensitivity", "down_centers"):
        assert bf16[name].dtype == torch.float32
        assert _rel(bf16[name], f32[name]) < STAT_TOL, name
    assert torch.equal(bf16["token_counts"], f32["token_counts"])


class _Moments:
    """What ica and gprune_modules receive from stream_mlp: checked float32, reduced to float64 sums."""

    def __init__(self):
        self.sums: dict[int, torch.Tensor] = {}
        self.weights: dict[int, torch.dtype] = {}

    def add(self, layer, rows, act, up):
        assert act.dtype == up.dtype == torch.float32
        h = torch.cat([act, up], 1).double()
        self.sums[layer] = self.sums.get(layer, 0) + torch.stack([h.sum(0), h.square().sum(0)])

    def end_layer(self, layer, mlp):
        self.weights[layer] = mlp.down_proj.weight.dtype


def test_stream_mlp_hands_float32_activations_close():
    out = {}
    for dt in DTYPES:
        consumer = _Moments()
        stream_mlp(_model(dt), _calib(), consumer, batch_size=4)
        assert set(consumer.weights.values()) == {dt}  # the blocks really ran in dt
        out[dt] = consumer.sums
    for li in range(N_LAYERS):
        assert _rel(out[torch.bfloat16][li], out[torch.float32][li]) < STAT_TOL, li


def test_attribute_sums_are_float64_and_close():
    ids = _calib()
    owner = np.repeat(np.arange(4), 2)[:, None].repeat(ids.shape[1], 1)  # 4 articles of 2 windows
    acc = {dt: stream_activations(_model(dt), ids, owner, 4, 4, 3, "cpu") for dt in DTYPES}
    assert acc[torch.bfloat16].sums.dtype == torch.float64
    assert _rel(acc[torch.bfloat16].sums, acc[torch.float32].sums) < STAT_TOL
    # the top contexts are tokens: most of them are the same tokens
    a, b = acc[torch.float32].top_index, acc[torch.bfloat16].top_index
    assert (a == b).float().mean() > 0.8


def test_method_statistics_accumulate_in_float32_or_wider():
    x = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(3)) * 4
    xb = x.to(torch.bfloat16)
    h32, hb = obc.HessianAccumulator(8), obc.HessianAccumulator(8)
    s32, sb = InputStats(), InputStats()
    for a, b in zip(x, xb):
        h32.add_batch(a.float()), hb.add_batch(b)
        s32.add_batch(b.float()), sb.add_batch(b)
    assert hb.hessian.dtype == torch.float32
    # the bfloat16 batches were cast before the accumulate: the same sums as from their float32 copies
    ref = obc.HessianAccumulator(8)
    for b in xb:
        ref.add_batch(b.float())
    assert torch.equal(hb.hessian, ref.hessian)
    assert _rel(hb.hessian, h32.hessian) < STAT_TOL
    assert sb.mean.dtype == torch.float64 and torch.equal(sb.variance, s32.variance)


# ---------------------------------------------------------------------------------------------- prune

# A unit changes only when its score lies within the bfloat16 rounding of the statistics (about 1%,
# above) of the block's cut-off. Measured here (flap, wanda_sp, obc, obc_iter, f_fang, o_fang, magnitude):
# 0 or 1 of the 106-138 neurons kept per method differ.
# At least 95% must agree (at most 5-7 swaps): room for rounding, not for a wrong statistic, which
# reshuffles a random-weight model's choices wholesale (chance agreement at 30% sparsity is ~70%).
AGREEMENT = 0.95


def _prune(method: str, dt: torch.dtype, cap):
    model = _model(dt)
    kw = {"inputs": make_fang_inputs(cap, [0.2, 0.3, 0.4])} if "fang" in method else {}
    report = prune_model(model, cap, method, 0.3, batch_size=4, options=PruneOptions(tau=1.0), **kw)
    kept = [layer.mlp.kept_neurons.tolist() for layer in model.model.layers]
    heads = [layer.self_attn.q_proj.out_features for layer in model.model.layers]
    return model, report, kept, heads


@pytest.mark.parametrize("method", ["flap", "obc", "o_fang"])
def test_prune_in_bfloat16_keeps_mostly_the_same_units(method, captures, tmp_path):
    cap = captures[torch.float32]
    _, _, kept32, heads32 = _prune(method, torch.float32, cap)
    model, report, kept16, heads16 = _prune(method, torch.bfloat16, cap)
    assert report.compute_dtype == "bfloat16" and report.as_dict()["compute_dtype"] == "bfloat16"
    assert [len(k) for k in kept16] == [len(k) for k in kept32] and heads16 == heads32  # same plan
    assert sum(len(k) for k in kept32) < N_LAYERS * 64  # something was pruned
    same = sum(len(set(a) & set(b)) for a, b in zip(kept32, kept16))
    assert same / sum(len(k) for k in kept32) >= AGREEMENT
    # stored back in the model's dtype (compensated weights and FLAP's biases too), and it runs and reloads
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert_reloads_identically(model, _calib()[:2], tmp_path)


def test_bfloat16_with_disk_streaming_is_the_same_as_without(tmp_path):
    """model.offload=disk reads each block in the compute dtype: the same bits as the whole model in it."""
    path = tmp_path / "model"
    _model(torch.float32).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    stats = {}
    for mode in ("none", "disk"):
        model, _ = load_dense_offloaded(path, "cpu", "bfloat16", offload=mode)
        assert model.get_input_embeddings().weight.dtype == torch.bfloat16
        capture_features(model, _calib(), tmp_path / f"{mode}.zarr", batch_size=4, dtype="float32", keep=())
        stats[mode] = open_capture(tmp_path / f"{mode}.zarr")["down_in_var"][:]
    assert np.array_equal(stats["none"], stats["disk"])


# ---------------------------------------------------------------------------------------------- diagnostic script


def _diagnostic():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "studies" / "diagnostics" / "compute_dtype.py"
    spec = importlib.util.spec_from_file_location("compute_dtype_diagnostic", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _metrics(ppl_nll: list[float], correct: list[int]) -> dict:
    """A `fang evaluate` JSON in miniature: per-window NLL of one topic, the seven tasks' per-question scores."""
    from fang.data.paper_tasks import PAPER_TASKS

    tasks = {t: {"acc": float(np.mean(correct)), "acc_stderr": 0.1,
                 "per_example": {"doc_id": list(range(len(correct))), "acc": [float(c) for c in correct]}}
             for t in PAPER_TASKS}
    return {"ppl": float(np.exp(sum(ppl_nll) / (10 * len(ppl_nll)))), "dtype": "bfloat16",
            "ppl_windows": {"nll": {"Arts": ppl_nll}, "tokens_per_window": 10}, "tasks": tasks}


def test_diagnostic_reports_units_metrics_and_timings(captures, tmp_path):
    import json

    from fang.core.atomic import write_json
    from fang.model.shrink import STRUCTURE_FILE, save_pruned

    diag = _diagnostic()
    cap = captures[torch.float32]
    dirs, kept = {}, {}
    for name, method, dt in (("f32", "obc", torch.float32), ("bf16", "obc", torch.bfloat16),
                             ("flap", "flap", torch.float32)):
        model, report, kept[name], _ = _prune(method, dt, cap)
        dirs[name] = tmp_path / name
        save_pruned(model, tiny_tokenizer(), dirs[name])
        write_json(tmp_path / f"{name}.prune.json", report.as_dict())
    timings = {}
    for name, seconds in (("f32", 10.0), ("bf16", 6.0)):
        timings[name] = tmp_path / f"{name}.timings.jsonl"
        timings[name].write_text("\n".join(json.dumps(e) for e in [
            {"stage": "capture", "args": ["None"], "seconds": seconds, "peak_rss_mib": 100, "load_avg": [1, 1, 1]},
            {"stage": "prune", "args": ["obc", "0.3", f"artifacts/sweep/{name}", "None"], "seconds": 2 * seconds},
        ]) + "\n")
    metrics = [tmp_path / "f32.m.json", tmp_path / "bf16.m.json"]
    write_json(metrics[0], _metrics([30.0, 31.0, 29.0, 30.5], [1, 0, 1, 1, 0, 1]))
    write_json(metrics[1], _metrics([30.1, 31.2, 29.1, 30.4], [1, 0, 1, 0, 0, 1]))
    out = tmp_path / "cd.json"
    diag.main([str(dirs["f32"]), str(dirs["bf16"]), "--out", str(out), "--metrics", *map(str, metrics),
               "--timings", str(timings["f32"]), str(timings["bf16"])])
    res = json.loads(out.read_text())
    assert res["a"]["weights_dtype"] == "float32" and res["b"]["weights_dtype"] == "bfloat16"
    assert res["b"]["prune"]["compute_dtype"] == "bfloat16"
    units = res["units"]
    both = sum(len(set(a) & set(b)) for a, b in zip(kept["f32"], kept["bf16"]))
    assert units["summary"]["ffn"]["both"] == both
    assert units["summary"]["ffn"]["differ"] == sum(len(a) + len(b) for a, b in zip(kept["f32"], kept["bf16"])) - 2 * both
    # same plan, heads matched by their rows across float32 and bfloat16: every kept head found in both
    assert all(e["heads"]["both"] == e["heads"]["a"] == e["heads"]["b"] for e in units["blocks"])
    # the row matching (checkpoints without kept_neurons) finds what kept_neurons says, here against flap
    ref = diag.compare_units(diag.Weights(dirs["f32"]), diag.Weights(dirs["flap"]))
    for d in (dirs["f32"], dirs["flap"]):
        s = json.loads((d / STRUCTURE_FILE).read_text())
        for layer in s["layers"]:
            layer.pop("kept_neurons")
        (d / STRUCTURE_FILE).write_text(json.dumps(s))
    rows = diag.compare_units(diag.Weights(dirs["f32"]), diag.Weights(dirs["flap"]))
    assert [e["ffn"]["from"] for e in rows["blocks"]] == ["gate_proj rows"] * N_LAYERS
    assert [e["ffn"]["both"] for e in rows["blocks"]] == [e["ffn"]["both"] for e in ref["blocks"]]
    assert ref["summary"]["ffn"]["differ"] > 0  # two methods: the comparison can tell units apart
    m = res["metrics"]
    assert m["a"]["avg7"] == pytest.approx(4 / 6) and m["b"]["avg7"] == pytest.approx(3 / 6)
    assert m["paired_b_vs_a"]["accuracy"]["average_avg7"]["estimate"] == pytest.approx(-1 / 6)
    assert m["paired_b_vs_a"]["perplexity"]["overall"]["n"] == 4
    t = {r["stage"]: r for r in res["timings"]}  # prune matched although its --out differs
    assert t["capture"]["ratio_b_a"] == 0.6 and t["prune"]["seconds_b"] == 12.0


def test_stages_read_compute_dtype_from_params(tmp_path, monkeypatch):
    """calibrate -> capture -> cluster -> taylor -> prune, ica, gprune_modules and attribute with model.compute_dtype float32 and
    bfloat16 in params.yaml: each stage loads the model in it and records it, the bfloat16 prune is saved
    in bfloat16, and the two prunes keep mostly the same units (the diagnostic script's count)."""
    import json
    from pathlib import Path

    import yaml

    from fang.analysis.store import open_store
    from stages import attribute, calibrate, capture, cluster, gprune_modules, ica, prune, taylor

    stage_project(tmp_path, _model(torch.float32))
    monkeypatch.chdir(tmp_path)
    root = Path("artifacts")
    for name in ("float32", "bfloat16"):
        params = {"model": {"compute_dtype": name}, "calibrate": {"n_samples": 6, "seq_len": 24},
                  "capture": {"batch_size": 3, "dtype": "float32"}, "cluster": {"pca_dim": 4, "k": 3},
                  "taylor": {"batch_size": 3}, "prune": {"batch_size": 3},
                  "ica": {"n_components": 3, "n_restarts": 1, "batch_size": 3},
                  "gprune": {"min_source_tokens": 16, "n_modules": 3, "batch_size": 3},
                  "attribute": {"batch_size": 3, "top_k": 2, "skip_first": 0}}
        Path("params.yaml").write_text(yaml.safe_dump(params))
        calibrate.run("params.yaml")
        capture.run("params.yaml")
        cluster.run("params.yaml")
        taylor.run("params.yaml")
        ica.run("params.yaml")
        gprune_modules.run("params.yaml")
        attribute.run("params.yaml")
        prune.run("params.yaml", method="obc", sparsity=0.3, out=f"artifacts/pruned-{name}")
        recorded = [dict(open_capture(root / "capture.zarr").attrs),
                    dict(open_store(root / "taylor.zarr", "taylor", "taylor").attrs),
                    dict(open_store(root / "ica.zarr", "ica", "ica").attrs),
                    dict(open_store(root / "gprune.zarr", "gprune", "gprune").attrs),
                    json.loads((root / "attribution.json").read_text()),
                    json.loads((root / f"pruned-{name}.prune.json").read_text())]
        # float32 is left out (outputs keep their earlier bytes), bfloat16 is recorded everywhere
        assert [r.get("compute_dtype", "float32") for r in recorded] == [name] * 6
        assert name == "bfloat16" or not any("compute_dtype" in r for r in recorded)
        assert json.loads((root / f"pruned-{name}/config.json").read_text())["dtype"] == name
    res = _diagnostic().compare(root / "pruned-float32", root / "pruned-bfloat16")
    assert res["b"]["weights_dtype"] == "bfloat16" and res["b"]["prune"]["compute_dtype"] == "bfloat16"
    assert res["units"]["summary"]["ffn"]["agreement"] >= AGREEMENT


def test_bfloat16_prune_with_disk_streaming_saves_the_same_weights(tmp_path):
    """obc in bfloat16 with model.offload=disk (blocks read in bfloat16, pruned blocks spilled to disk, saved
    shard by shard) gives the weights of the same prune with every block in memory."""
    from fang.model.shrink import load_pruned, save_pruned

    path = tmp_path / "model"
    _model(torch.float32).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    dense, _ = load_dense_offloaded(path, "cpu", "float32")
    capture_features(dense, _calib(), tmp_path / "cap.zarr", batch_size=4, dtype="float32")
    cap = open_capture(tmp_path / "cap.zarr")
    states = {}
    for mode in ("none", "disk"):
        model, tok = load_dense_offloaded(path, "cpu", "bfloat16", offload=mode,
                                          spill=tmp_path / "spill" if mode == "disk" else None)
        report = prune_model(model, cap, "obc", 0.3, batch_size=4)
        assert report.compute_dtype == "bfloat16"
        save_pruned(model, tok, tmp_path / f"pruned-{mode}")
        states[mode] = load_pruned(tmp_path / f"pruned-{mode}")[0].state_dict()
    assert states["none"].keys() == states["disk"].keys()
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, states["disk"][k]) for k, v in states["none"].items()
               if v.is_floating_point() and "inv_freq" not in k)


def test_taylor_in_bfloat16_reads_the_residual_stream_of_a_bfloat16_capture(tmp_path):
    """The stream is stored in float32 but holds bfloat16 values: taylor hands them back to the blocks
    unchanged, so the scores match its own bfloat16 forward (same batches: the same rounding)."""
    from fang.analysis.capture import capture_residual

    ids = _calib()
    clusters = torch.randint(0, 3, (N_LAYERS, ids.numel()), generator=torch.Generator().manual_seed(1))
    model = _model(torch.bfloat16)
    capture_features(model, ids, tmp_path / "cap.zarr", batch_size=4, keep=(), residual=True)
    residual = capture_residual(open_capture(tmp_path / "cap.zarr"), ids, "bfloat16")
    assert residual is not None and residual.dtype == np.float32
    read = taylor_scores(model, ids, clusters, 3, batch_size=4, residual=residual)
    own = taylor_scores(model, ids, clusters, 3, batch_size=4)
    for name in ("scores", "block_sensitivity", "down_centers"):
        torch.testing.assert_close(read[name], own[name], rtol=0, atol=0, msg=name)
