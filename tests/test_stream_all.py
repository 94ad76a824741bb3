"""Every stage streams (issue 26, part 2): with model.offload=disk, ica, gprune_modules, attribute, the bench
and the task screen run with one decoder block on the device at a time and write the results they write
without it; save_pruned writes shard by shard; and the whole pipeline runs under a memory cap smaller than
the model's weights (tests/stream_capped.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_checkpoint, tiny_model
from method_cases import SPARSITY, calibration

from fang.analysis.attribute import stream_activations
from fang.analysis.capture import capture_features, open_capture
from fang.core.errors import FangError
from fang.methods.driver import prune_model
from fang.model.layerwise import input_hooks
from fang.model.modeling import decoder_layers, load_dense
from fang.model.offload import block_stream, load_dense_offloaded, resident_blocks
from fang.model.shrink import INDEX_FILE, WEIGHTS_FILE, load_any, load_pruned, save_pruned

ROOT = Path(__file__).resolve().parents[1]
N_LAYERS = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("stream") / "model", tiny_model(6, 3, layers=N_LAYERS))


def _one_block_at_a_time(model) -> list:
    """Forward hooks recording which blocks hold real tensors at the end of every block's forward."""
    seen: list = []
    for i, layer in enumerate(decoder_layers(model)):
        layer.register_forward_hook(lambda _m, _a, _o, i=i: seen.append((i, resident_blocks(model))))
    return seen


@torch.no_grad()
def _whole_model_reference(model, ids, owner, n_articles, batch_size, top_k):
    """What attribute computed before it ran block by block: one whole-model forward per batch."""
    from fang.analysis.attribute import Accumulator
    from fang.model.layerwise import batch_slices

    layers = decoder_layers(model)
    acc = Accumulator(len(layers), model.config.intermediate_size, n_articles, top_k)
    owner_t, flat = torch.as_tensor(owner), torch.arange(ids.numel()).view(ids.shape)
    current = {}
    with input_hooks({str(i): layer.mlp.down_proj for i, layer in enumerate(layers)},
                     lambda name, x: acc.add(int(name), x, owner_t[current["sl"]], flat[current["sl"]])):
        for sl in batch_slices(ids.shape[0], batch_size):
            current["sl"] = sl
            model.model(input_ids=ids[sl], use_cache=False)
    return acc


def test_attribute_runs_block_by_block_with_the_results_of_a_whole_model_forward(checkpoint):
    ids = calibration()
    owner = np.random.default_rng(0).integers(-1, 5, size=ids.shape)  # 5 articles, some tokens skipped
    dense, _ = load_dense(checkpoint)
    want = _whole_model_reference(dense, ids, owner, 5, 4, 3)
    for mode in ("none", "host", "disk"):
        model, _ = load_dense_offloaded(checkpoint, offload=mode)
        seen = _one_block_at_a_time(model)
        got = stream_activations(model, ids, owner, 5, batch_size=4, top_k=3, device="cpu")
        for name in ("sums", "counts", "top_value", "top_index"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (mode, name)
        if mode != "none":
            assert seen and all(resident == [i] for i, resident in seen), seen
            assert [i for i, _ in seen] == [i for i in range(N_LAYERS) for _ in range(2)]  # each block once, 2 batches


def _pruned(checkpoint, tmp_path):
    dense, tok = load_dense(checkpoint)
    capture_features(dense, calibration(), tmp_path / "cap.zarr", batch_size=3, dtype="float32")
    prune_model(dense, open_capture(tmp_path / "cap.zarr"), "flap", SPARSITY, "kv_group", batch_size=4)
    return dense, tok


def test_a_sharded_pruned_checkpoint_loads_in_fang_and_in_stock_transformers(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = _pruned(checkpoint, tmp_path)
    save_pruned(model, tok, tmp_path / "single")
    save_pruned(model, tok, tmp_path / "sharded", shards=True)
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    files = sorted({*index["weight_map"].values()})
    assert files == [f"model-{i:05d}-of-{N_LAYERS + 1:05d}.safetensors" for i in range(1, N_LAYERS + 2)]
    assert not (tmp_path / "sharded" / WEIGHTS_FILE).exists()
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)  # untied model: every tensor once
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert all(index["weight_map"][k] == files[int(k.split(".")[2])] for k in state if k.startswith("model.layers."))
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    want = model(ids).logits
    for path in ("single", "sharded"):
        assert torch.equal(load_pruned(tmp_path / path)[0](ids).logits, want), path
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / path, trust_remote_code=True).eval()
        assert torch.allclose(stock(ids).logits, want, atol=1e-5), path
    # float16, streamed from the shards block by block: what load_any gives in memory
    ref = load_any(tmp_path / "sharded", "cpu", "float16")[0]
    streamed = load_any(tmp_path / "sharded", "cpu", "float16", "disk")[0]
    assert resident_blocks(streamed) == [] and block_stream(streamed).disk is not None
    from fang.model.offload import streamed_forward

    with streamed_forward(streamed):
        assert torch.equal(streamed(ids).logits, ref(ids).logits)
    for (n, a), (_, b) in zip(ref.named_buffers(), streamed.named_buffers()):  # rotary inv_freq cast alike
        assert a.dtype == b.dtype and torch.equal(a, b), n


def test_a_damaged_shard_is_named(checkpoint, tmp_path):
    model, tok = _pruned(checkpoint, tmp_path)
    save_pruned(model, tok, tmp_path / "p", shards=True)
    shard = tmp_path / "p" / f"model-00002-of-{N_LAYERS + 1:05d}.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    for load in (load_pruned, lambda p: load_any(p, "cpu", "float32", "disk")):
        with pytest.raises(FangError, match="model-00002-of-00004.safetensors is corrupt: its sha256"):
            load(tmp_path / "p")
    shard.unlink()
    with pytest.raises(FangError, match="model-00002-of-00004.safetensors .listed in model.safetensors.index.json. is missing"):
        load_pruned(tmp_path / "p")


def test_a_streamed_model_is_saved_in_shards_only(checkpoint, tmp_path):
    model, tok = load_dense_offloaded(checkpoint, offload="disk")
    with pytest.raises(FangError, match="streamed model .* is written in shards"):
        save_pruned(model, tok, tmp_path / "p", shards=False)
    save_pruned(model, tok, tmp_path / "p")  # a dense streamed model: its blocks read from the checkpoint
    dense = load_dense(checkpoint)[0].state_dict()
    saved = load_pruned(tmp_path / "p")[0].state_dict()
    assert dense.keys() == saved.keys() and all(torch.equal(dense[k], saved[k]) for k in dense)


def test_the_bench_floor_streams_its_forward_and_leaves_out_the_backward(checkpoint):
    from fang.tools.bench import floor, render, timings

    model, _ = load_dense_offloaded(checkpoint, offload="disk")
    seen = _one_block_at_a_time(model)
    result = floor.measure_floor(model, calibration(), 4, 2)
    assert seen and all(resident == [i] for i, resident in seen)
    assert result["forward"]["seconds_full"] > 0 and result["forward_backward"] is None
    assert "model.offload" in result["forward_backward_skipped"]
    stage = {"stage": "taylor", "label": "taylor", "seconds": 3.0, "peak_rss_mib": 10, "load5": 1.0, "time": None,
             "main_prune": False}
    rows = timings.check_targets([stage], result)
    taylor = next(r for r in rows if r["target"].startswith("taylor"))
    assert taylor["status"] == "no data" and "compute floor" in taylor["missing"]
    from fang.tools.bench.machine import machine_info

    bench = {"time": "t", "machine": machine_info(torch.device("cpu")),
             "pipeline": {"stages": [stage], "floor": result, "targets": rows}}
    assert "forward+backward not measured (model.offload" in render.render_markdown(bench)
    assert "forward+backward not measured" in render.render_fragment(bench)
    # the forward floor of the plain model is measured the same way (one more check that nothing else changed)
    plain = floor.measure_floor(load_dense(checkpoint)[0], calibration(), 4, 2)
    assert plain["forward_backward"]["seconds_full"] > 0 and "forward_backward_skipped" not in plain


def test_screen_scores_are_identical_when_the_model_streams(checkpoint, tmp_path):
    """The screen's lm-eval scoring is a whole-model forward per request batch: streamed, each block is fetched
    as the forward reaches it (streamed_forward) and the scores are the same."""
    import stream_project
    from stages.screen_tasks import _evaluate

    stream_project.build(tmp_path, 1)  # for its BIG-bench task folder
    task_dir = tmp_path / "artifacts/data/tasks"
    out = {}
    for mode in ("none", "disk"):
        model, tok = load_dense_offloaded(checkpoint, offload=mode)
        seen = _one_block_at_a_time(model)
        out[mode] = _evaluate(model, tok, task_dir, {"tiny_mc": "bb_tiny_mc"}, 6, 2)
        if mode == "disk":
            assert seen and all(resident == [i] for i, resident in seen)
            assert resident_blocks(model) == []
    assert out["disk"] == out["none"] and out["none"]["bb_tiny_mc"]["n"] == 6


# ---------------------------------------------------------------------------------------------- whole pipeline


def _json_without_timings(path: Path):
    """A JSON result without what depends on the clock or the folder: seconds, tokens/s, paths."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()
                    if not (k.startswith("seconds") or k.endswith(("_seconds", "_tok_s", "_speedup")) or k in
                            ("time", "measured", "bigbench_source", "weights_sha256", "checkpoint_bytes", "machine",
                             "offload", "timings_file", "floor", "forward_backward_skipped", "targets"))}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return clean(json.loads(path.read_text()))


@pytest.mark.slow
def test_every_stage_writes_the_same_results_streamed_from_disk(tmp_path):
    """fetch_model → calibrate → ... → bench (tests/stream_project.py) with model.offload none and disk: every file
    the same, except the dense and pruned weights' layout (one file / shards, the same tensors) and what is a clock
    reading."""
    import stream_project

    for mode in ("none", "disk"):
        stream_project.build(tmp_path / mode, N_LAYERS)
        stream_project.run_pipeline(tmp_path / mode, mode)
    a, b = tmp_path / "none/artifacts", tmp_path / "disk/artifacts"
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    streamed = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    # the one layout difference: the dense and the pruned weights in one file, or one shard per block
    assert files - streamed == {Path("pruned", WEIGHTS_FILE), Path("model", WEIGHTS_FILE)}
    assert {f.name for f in streamed - files if f.parts[0] == "model"} == \
        {INDEX_FILE} | {f"model-{i:05d}-of-{N_LAYERS + 1:05d}.safetensors" for i in range(1, N_LAYERS + 2)}
    want, got = load_dense(a / "model")[0].state_dict(), load_dense(b / "model")[0].state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    for f in sorted(files - {Path("pruned", WEIGHTS_FILE), Path("model", WEIGHTS_FILE)}):
        if f.suffix == ".json":
            assert _json_without_timings(a / f) == _json_without_timings(b / f), f
        elif f.parts[0] != "bench":  # bench.md and its fragment print the timings
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    for store in ("capture.zarr", "ica.zarr", "gprune.zarr", "attribution.zarr", "taylor.zarr"):
        assert any(f.parts[0] == store for f in files), store  # every newly streamed stage wrote its store
    assert (b / "pruned" / INDEX_FILE).exists()
    want, got = load_pruned(a / "pruned")[0].state_dict(), load_pruned(b / "pruned")[0].state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    bench = json.loads((b / "bench/bench.json").read_text())
    assert bench["pipeline"]["floor"]["forward_backward"] is None and bench["inference"]["offload"] == "disk"


@pytest.mark.slow
def test_the_whole_pipeline_runs_under_a_memory_cap_smaller_than_the_model(tmp_path):
    """Every stage, model.offload=disk, on a 40-block random LLaMA (d = 256, FFN 1024: 150 MiB of float32
    weights, 3.75 MiB per block) under an address-space cap of what the process had mapped after a
    warm-up + half the model's weights; then the control: loading the model whole under that cap fails.

    Why RLIMIT_AS and how: it is the limit the kernel enforces on every mapping, so exceeding it fails
    at once inside the stage that does (RLIMIT_DATA would miss memory-mapped weights, which is how
    transformers loads an in-memory model; a peak-RSS check would miss nothing but prove less). Its
    catch is that it counts address space, not RAM: torch and lm-eval map ~2.5 GiB at import, so the
    cap is set relative to the address space after a warm-up that ran every stage on a 2-block model
    of the same width (libraries, threads and allocator pools are then in place). glibc is told to
    serve big allocations from mmap (MALLOC_MMAP_THRESHOLD_) and use one arena, so freed memory
    leaves the address space instead of staying as reserved heap. safetensors maps a whole file to
    read one tensor, so the dense checkpoint comes in shards of about one block, as big checkpoints do.
    Measured on this machine: at most 58 MiB over the baseline in any stage (the screen's KV cache),
    against 150 MiB of weights. Finally the capped run's pruned model is compared with the same prune
    run in memory, unstreamed and uncapped, from the same artifacts."""
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FANG_NO_PROGRESS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MALLOC_ARENA_MAX": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/stream_capped.py"), str(tmp_path), "40", "256", "1024",
                           "0.5"], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] is None, (out["stages_done"], out["error"])
    import yaml

    import stream_project

    assert [s for s, _ in out["stages_done"]] == ["fetch_model", "calibrate", "capture", "cluster", "taylor", "group",
                                                  "allocate",
                                                  "prune", "evaluate", "ica", "gprune_modules", "attribute",
                                                  "screen_tasks", "bench"]
    assert out["headroom"] < 0.6 * out["weight_bytes"] and out["block_bytes"] * 30 < out["weight_bytes"]
    assert out["control"] is not None and out["control"] != "loaded", out["control"]  # the whole model does not fit

    # the pruned model written under the cap, shard by shard, is the one the in-memory prune writes
    from stages import prune

    deep = tmp_path / "deep"
    cwd = os.getcwd()
    os.chdir(deep)
    try:
        Path("params.yaml").write_text(yaml.safe_dump(stream_project.params("none")))
        prune.run("params.yaml", out="artifacts/pruned-memory")
    finally:
        os.chdir(cwd)
    assert (deep / "artifacts/pruned" / INDEX_FILE).exists()
    capped = load_pruned(deep / "artifacts/pruned")[0].state_dict()
    memory = load_pruned(deep / "artifacts/pruned-memory")[0].state_dict()
    assert capped.keys() == memory.keys() and all(torch.equal(capped[k], memory[k]) for k in capped)
    assert json.loads((deep / "artifacts/metrics/prune.json").read_text())["achieved_sparsity"] > 0.25
