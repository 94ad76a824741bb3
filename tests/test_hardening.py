"""Issue 16: bad input fails with one clear line, damaged artifacts are noticed, interrupts clean up.

One test (or a small group) per item of the issue, on tiny models and tiny stores.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import captured, tiny_model
from helpers_tokenizer import tiny_tokenizer

from fang.core.errors import FangError

ROOT = Path(__file__).resolve().parents[1]


def _dense_dir(path: Path, layers: int = 2) -> Path:
    model = tiny_model(6, 3, layers=layers)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _truncate(f: Path, keep: float = 0.5) -> None:
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])


def _huge_header(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    f.write_bytes(bytes(data))


# ------------------------------------------------------------------ safetensors: dense and pruned


@pytest.mark.parametrize("damage, words", [(_truncate, "truncated"), (_huge_header, "header too large")])
def test_damaged_dense_weights_fail_with_the_file_named(tmp_path, damage, words):
    from fang.data.fetch import fetch_model
    from fang.model.modeling import load_dense

    src = _dense_dir(tmp_path / "dense")
    damage(src / "model.safetensors")
    for call in (lambda: load_dense(src), lambda: fetch_model(str(src), tmp_path / "out")):
        with pytest.raises(FangError, match=words) as info:
            call()
        assert "model.safetensors" in str(info.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


@pytest.fixture
def pruned_dir(tmp_path) -> Path:
    from fang.model.shrink import save_pruned, shrink_mlp

    model = tiny_model(4, 4)
    shrink_mlp(model.model.layers[0].mlp, torch.arange(32))
    return save_pruned(model, tiny_tokenizer(), tmp_path / "pruned")


@pytest.mark.parametrize("damage, words", [(_truncate, "truncated"), (_huge_header, "header too large")])
def test_damaged_pruned_weights_fail_with_the_file_named(pruned_dir, damage, words):
    from fang.model.shrink import load_pruned

    damage(pruned_dir / "model.safetensors")
    with pytest.raises(FangError, match=words):
        load_pruned(pruned_dir)


def test_flipped_weight_bytes_fail_the_checksum(pruned_dir):
    from fang.model.shrink import load_pruned

    structure = json.loads((pruned_dir / "structure.json").read_text())
    assert len(structure["weights_sha256"]) == 64
    load_pruned(pruned_dir)  # intact: loads
    f = pruned_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-40] ^= 0x01  # one bit of the last tensor: still a valid file, wrong weights
    f.write_bytes(bytes(data))
    with pytest.raises(FangError, match="checksum"):
        load_pruned(pruned_dir)


def test_non_llama_is_rejected_from_config_before_any_weight_is_read(tmp_path, monkeypatch):
    import transformers
    from transformers import GPT2Config

    from fang.data.fetch import fetch_model
    from fang.model.modeling import load_dense

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "gpt2" / "model.safetensors").write_bytes(b"not weights at all")

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the model type was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    for call in (lambda: load_dense(tmp_path / "gpt2"), lambda: fetch_model(str(tmp_path / "gpt2"), tmp_path / "out")):
        with pytest.raises(FangError, match="unsupported model type 'gpt2'"):
            call()


# ------------------------------------------------------------------ Zarr stores


def _chunk(store: Path, array: str, layer: int) -> Path:
    return sorted(p for p in (store / array / "c" / str(layer)).rglob("*") if p.is_file())[0]


@pytest.fixture
def capture_store(tmp_path, calib) -> Path:
    captured(tiny_model(6, 3, layers=3), calib, tmp_path, batch_size=3)
    return tmp_path / "cap.zarr"


@pytest.mark.parametrize("array, layer", [("ffn_in", 1), ("block_io", 0), ("down_in", 2)])
def test_deleted_capture_chunk_is_named_not_read_as_zeros(capture_store, array, layer):
    from fang.analysis.capture import open_capture

    _chunk(capture_store, array, layer).unlink()
    with pytest.raises(FangError, match=f"incomplete: array {array}, layer {layer} .*missing"):
        open_capture(capture_store)


def test_truncated_capture_chunk_is_named(capture_store):
    from fang.analysis.capture import open_capture

    _truncate(_chunk(capture_store, "ffn_in", 1))
    with pytest.raises(FangError, match="array ffn_in, layer 1 .*bytes"):
        open_capture(capture_store)


def test_flipped_chunk_bytes_fail_on_read_with_array_and_layer(capture_store):
    from fang.analysis.capture import open_capture

    f = _chunk(capture_store, "ffn_in", 1)
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))
    cap = open_capture(capture_store)  # same sizes: only reading can tell
    assert cap["ffn_in"][0].shape[0] > 0  # other layers still read
    with pytest.raises(FangError, match="cannot read array ffn_in, layer 1"):
        cap["ffn_in"][1]


def test_deleted_chunk_of_an_analysis_store_is_named(tmp_path):
    from fang.analysis.store import open_store, write_store

    write_store(tmp_path / "t.zarr", "taylor", {"scores": np.arange(24.0).reshape(3, 2, 4) + 1}, {"k": 2})
    assert open_store(tmp_path / "t.zarr", "taylor", "taylor")["scores"][2, 1, 3] == 24.0
    _chunk(tmp_path / "t.zarr", "scores", 2).unlink()
    with pytest.raises(FangError, match="array scores, layer 2 .*missing.*dvc repro taylor"):
        open_store(tmp_path / "t.zarr", "taylor", "taylor")


def test_unreadable_store_metadata_is_one_line(capture_store):
    from fang.analysis.capture import open_capture

    (capture_store / "zarr.json").write_text("{oops")
    with pytest.raises(FangError, match="zarr.json"):
        open_capture(capture_store)


# ------------------------------------------------------------------ params and devices


@pytest.mark.parametrize("value", ["gpu", "cuda", "cuda:0", "tpu"])
def test_bad_fang_device_is_one_line(monkeypatch, value):
    from fang.core.device import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("FANG_DEVICE", value)
    with pytest.raises(FangError, match=f"FANG_DEVICE='{value}'"):
        pick_device()
    monkeypatch.setenv("FANG_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")


def test_null_topics_are_rejected_not_read_as_all():
    from fang.core.params import CalibrateParams, parse_block

    with pytest.raises(FangError, match="calibrate.topics is null"):
        parse_block("calibrate", {"topics": None}, CalibrateParams)
    assert parse_block("calibrate", {"topics": []}, CalibrateParams).topics == []


def test_unknown_top_level_block_is_rejected(tmp_path):
    from fang.core.params import load_block

    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"prune": {"sparsity": 0.3}, "prunes": {"sparsity": 0.5}}))
    with pytest.raises(FangError, match="unknown top-level block.*prunes"):
        load_block("cluster", path=f)


def _project(root: Path, **params) -> None:
    """A working directory with params.yaml and an artifacts/ folder for stage-level tests."""
    full = yaml.safe_load((ROOT / "params.yaml").read_text())
    for block, values in params.items():
        full[block].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(full))
    (root / "artifacts").mkdir(exist_ok=True)


def test_seq_len_above_max_position_embeddings_is_rejected(tmp_path, monkeypatch):
    import stages.calibrate

    _project(tmp_path, calibrate={"seq_len": 300})
    _dense_dir(tmp_path / "artifacts" / "model")  # max_position_embeddings = 256
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FangError, match=r"calibrate.seq_len=300 exceeds the model's max_position_embeddings \(256\)"):
        stages.calibrate.run()
    assert not (tmp_path / "artifacts" / "calib").exists()


# ------------------------------------------------------------------ pruning driver and clustering


def test_prune_warns_when_achieved_sparsity_misses_the_target(tmp_path, monkeypatch, capsys, calib):
    import stages.prune

    _project(tmp_path, prune={"batch_size": 3})
    art = tmp_path / "artifacts"
    _dense_dir(art / "model", layers=2)
    from fang.analysis.capture import capture_features
    from fang.model.modeling import load_dense

    capture_features(load_dense(art / "model")[0], calib, art / "capture.zarr", batch_size=3, dtype="float32")
    monkeypatch.chdir(tmp_path)
    stages.prune.run(method="flap", sparsity=0.3, out="artifacts/p30")
    assert "warning" not in capsys.readouterr().err
    stages.prune.run(method="flap", sparsity=0.99, out="artifacts/p99")
    report = json.loads((art / "p99.prune.json").read_text())
    err = " ".join(capsys.readouterr().err.split())
    assert report["achieved_sparsity"] < 0.99 - 0.05
    assert f"warning: flap achieved sparsity {report['achieved_sparsity']:.3f}" in err and "below the target 0.990" in err


def test_center_distances_match_the_definition_without_the_cube():
    from fang.analysis.cluster import center_distances

    c = torch.randn(9, 33, generator=torch.Generator().manual_seed(0)) * 3
    d = center_distances(c)
    ref = torch.tensor([[float(np.linalg.norm(a - b)) for b in c.double().numpy()] for a in c.double().numpy()], dtype=torch.float64)
    assert torch.allclose(d.double(), ref, rtol=1e-6, atol=0) and torch.all(d.diagonal() == 0)


def test_center_distances_memory_stays_at_one_row():
    # k=256 centres of n=4096: the [k, k, n] float64 cube would be 2 GiB
    code = textwrap.dedent("""
        import resource, torch
        from fang.analysis.cluster import center_distances
        c = torch.randn(256, 4096)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        center_distances(c)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) < 200  # MiB of peak growth


def test_nearest_centroid_chunks_shrink_with_k(monkeypatch):
    import fang.analysis.cluster as fc

    x, c = torch.randn(500, 6, generator=torch.Generator().manual_seed(1)), torch.randn(40, 6)
    whole = fc._nearest(x, c)
    monkeypatch.setattr(fc, "_ASSIGN_BYTES", 8 * 40 * 6 * 7)  # 7 rows per chunk
    parts = fc._nearest(x, c)
    assert torch.equal(whole[0], parts[0]) and torch.equal(whole[1], parts[1])


def test_cluster_refuses_a_k_that_needs_more_memory_than_available(tmp_path, monkeypatch, calib):
    import stages.cluster

    _project(tmp_path, cluster={"k": 5, "pca_dim": 8})
    from fang.analysis.capture import capture_features

    # the slim store fits the PCA while capturing: the store must carry cluster.pca_dim components
    capture_features(tiny_model(4, 4), calib, tmp_path / "artifacts" / "capture.zarr", batch_size=4,
                     dtype="float32", pca_dim=8)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FANG_MEMORY_MIB", "64")  # below the stage's ~256 MiB of fixed working set
    with pytest.raises(FangError, match=r"cluster.k=5 needs about .* of memory .* only 64 MiB is available: lower cluster.k"):
        stages.cluster.run()
    assert not (tmp_path / "artifacts" / "cluster.zarr").exists()
    monkeypatch.setenv("FANG_MEMORY_MIB", "100000")
    stages.cluster.run()
    assert (tmp_path / "artifacts" / "cluster.zarr" / "zarr.json").exists()


# ------------------------------------------------------------------ interrupts and temp files


def test_stale_temps_of_killed_runs_are_removed_by_the_next_write(tmp_path):
    from fang.core.atomic import atomic_dir, atomic_file

    dead = 2**22 + 12345  # above Linux's pid_max: no such process
    stale = [tmp_path / f".out.tmp-{dead}", tmp_path / ".out.tmp-k3j4h2g1", tmp_path / f".log.json.tmp-{dead}"]
    for p in stale[:2]:
        p.mkdir()
        (p / "big.bin").write_bytes(b"x" * 100)
    stale[2].write_text("half")
    live = tmp_path / f".out.tmp-{os.getppid()}"  # a running writer's temp is left alone
    live.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        assert tmp.name == f".out.tmp-{os.getpid()}"
        (tmp / "a").write_text("1")
    with atomic_file(tmp_path / "log.json") as fh:
        fh.write("{}")
    assert not any(p.exists() for p in stale) and live.exists()
    assert (tmp_path / "out" / "a").read_text() == "1" and (tmp_path / "log.json").read_text() == "{}"


class _Stage:
    def __init__(self, out: Path, how: str):
        self.out, self.how = out, how

    def run(self, *args) -> None:
        from fang.core.atomic import atomic_dir

        with atomic_dir(self.out) as tmp:
            (tmp / "partial").write_text("x")
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)  # the handler interrupts this
                raise AssertionError("SIGTERM did not interrupt the stage")
            raise KeyboardInterrupt


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_exits_130_says_interrupted_and_leaves_no_temp(tmp_path, monkeypatch, capsys, how):
    import fang.cli as cli

    monkeypatch.setattr(cli, "_stage", lambda name: _Stage(tmp_path / "out", how))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as info:
            cli.main(["cluster"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ smaller items


def test_console_is_wide_when_not_a_terminal():
    path = "artifacts/bias_sweep/Mathematics/o_fang-0.4/" + "deep/" * 30 + "model.safetensors"
    code = f"from fang.core.progress import console; console.print('saved to {path}')"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)})
    assert out.stderr.strip() == f"saved to {path}"


def test_timings_keep_the_latest_entry_per_stage_and_arguments(tmp_path):
    from fang.core.timings import record_timing

    log = tmp_path / "timings.jsonl"
    log.write_text('{"stage": "prune", "args": [], "seconds": 9}\n{"cut by a kill\n')
    for i in range(50):
        record_timing(log, {"stage": "capture", "args": ["None"], "seconds": i})
        record_timing(log, {"stage": "prune", "args": ["flap", "0.3"], "seconds": 100 + i})
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries == [{"stage": "prune", "args": [], "seconds": 9}, {"stage": "capture", "args": ["None"], "seconds": 49},
                       {"stage": "prune", "args": ["flap", "0.3"], "seconds": 149}]


def _task_folder(tmp_path: Path, prefix: str = "") -> Path:
    from fang.data.tasks import build_task_folder

    task = tmp_path / "bb" / "tiny_mc"
    task.mkdir(parents=True)
    examples = [{"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1)}} for i in range(6)]
    task_json = {"name": "tiny_mc", "examples": examples, "task_prefix": prefix}
    (task / "task.json").write_text(json.dumps(task_json))
    build_task_folder(["tiny_mc"], tmp_path / "bb", None, tmp_path / "tasks")
    return tmp_path / "tasks"


def test_task_folder_python_is_verified_before_lm_eval_imports_it(tmp_path):
    from fang.data.task_files import verify_task_folder

    tasks = _task_folder(tmp_path)
    verify_task_folder(tasks)  # as written: accepted
    loader = tasks / "_fang_data.py"
    original = loader.read_text()
    loader.write_text(original + "\nimport os; os.system('echo pwned')\n")
    with pytest.raises(FangError, match="_fang_data.py differs .*sha256"):
        verify_task_folder(tasks)
    loader.write_text(original)
    (tasks / "evil.py").write_text("def load(**kw): pass\n")
    with pytest.raises(FangError, match="evil.py"):
        verify_task_folder(tasks)
    (tasks / "evil.py").unlink()
    y = tasks / "bb_tiny_mc.yaml"
    y.write_text(y.read_text() + "process_results: !function _fang_data.load_evil\n")
    with pytest.raises(FangError, match="!function _fang_data.load_evil"):
        verify_task_folder(tasks)


def test_evaluate_stage_checks_the_task_folder_before_loading_anything(tmp_path, monkeypatch):
    import stages.evaluate

    _project(tmp_path)
    tasks = _task_folder(tmp_path / "artifacts" / "data")
    (tasks / "_fang_data.py").write_text("raise SystemExit('pwned')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FangError, match="_fang_data.py differs"):
        stages.evaluate.run(model_dir=str(tmp_path / "no_model"))


@pytest.mark.parametrize("prefix", ["Say {% endraw %}{{ 7 * 7 }} and {{ 1 }}:\n", "A set {", "\"quoted\" \\ {# x #} é"])
def test_bigbench_text_is_always_literal_in_the_prompt(tmp_path, prefix):
    from lm_eval.utils import apply_template

    tasks = _task_folder(tmp_path, prefix)
    config = yaml.safe_load((tasks / "bb_tiny_mc.yaml").read_text().split("custom_dataset:")[0])
    prompt = apply_template(config["doc_to_text"], {"question": "Is 2 even?", "choices": ["yes", "no"]})
    assert prompt.startswith((prefix + "\nQ: ").lstrip() + "Is 2 even?")


def test_capture_refuses_a_calibration_set_larger_than_memory(tmp_path, monkeypatch, calib):
    from safetensors.torch import save_file

    import stages.capture

    _project(tmp_path)
    _dense_dir(tmp_path / "artifacts" / "model")
    (tmp_path / "artifacts" / "calib").mkdir()
    save_file({"input_ids": calib.contiguous()}, tmp_path / "artifacts" / "calib" / "calib.safetensors")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FANG_MEMORY_MIB", "0.01")
    with pytest.raises(FangError, match=r"calibrate.n_samples=6 needs about .* lower calibrate.n_samples"):
        stages.capture.run()
    assert not (tmp_path / "artifacts" / "capture.zarr").exists()


def test_evaluate_with_task_limit_minus_one_runs_perplexity_only(tmp_path, monkeypatch):
    # the bias study's default: 72 cells x a full dev set would take a day on 2 cores
    import stages.evaluate
    import fang.evaluation.evaluate as ev

    _project(tmp_path, evaluate={"dtype": "float32", "ppl_seq_len": 16})
    _task_folder(tmp_path / "artifacts" / "data")
    _dense_dir(tmp_path / "artifacts" / "model")
    rows = [{"id": f"a{i}", "title": f"a{i}", "topic": t, "text": "one two three four five six seven " * 8}
            for i, t in enumerate(["People", "People", "Geography"])]
    (tmp_path / "artifacts" / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(ev, "zero_shot", lambda *a, **k: pytest.fail("no lm-eval task may run with task_limit -1"))
    monkeypatch.chdir(tmp_path)
    stages.evaluate.run(model_dir="artifacts/model", out="m.json", task_limit=-1)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["tasks"] == {} and metrics["task_limit"] == -1
    assert set(metrics["ppl_by_topic"]) == {"People", "Geography"} and metrics["ppl"] > 1
    # model.offload: the same perplexity windows with the blocks streamed (docs/scale.md)
    full = yaml.safe_load((tmp_path / "params.yaml").read_text())
    full["model"]["offload"] = "disk"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(full))
    stages.evaluate.run(model_dir="artifacts/model", out="m_disk.json", task_limit=-1)
    assert json.loads((tmp_path / "m_disk.json").read_text())["ppl_windows"] == metrics["ppl_windows"]
    with pytest.raises(FangError, match="bias.task_limit must be >= -1"):
        from fang.core.params import BiasParams

        BiasParams(task_limit=-2).validate()
