"""Bad-input sweep: throw many kinds of bad input, hostile paths and interruption at the real `fang` CLI.

Every case runs the CLI in a fresh copy of a tiny project (3-layer random LLaMA, character
tokenizer, 72-article corpus, the pipelines' dvc.yaml files, every artifact built by the CLI
itself) and is judged:

- clear: non-zero exit, stderr is exactly one line and it names the problem (the case's keywords);
- handled: a case that must succeed (a rerun over fang's own output, a stale lock) exited 0;
- traceback: stderr holds a Python traceback;
- silent: exit status 0 on bad input (it was accepted);
- changed: something outside the command's own outputs changed (every file of the project is
  hashed before and after: a mistyped `--out` must not cost the user any of their data);
- left: a temp (`*.tmp*`), a lock (`*.lock`) or the command's output was left behind by a failure;
- unclear: anything else (several lines, a message that does not name the problem, death by signal).

    python -m fang.tools.badinput_sweep [--code DIR] [--work DIR] [--json FILE] [--only NAME,...] [--spawn]

Cases run in children forked from one server process that imported fang once, so the sweep costs
seconds per case less than a `python -m fang.cli` each (`--spawn` runs one such process per case;
interrupt cases always do). The server first builds the tiny project the same way (each stage in a
child) and runs a few refused commands in itself (`WARM_UP`), so that what a first command sets up
lazily is inherited by every child. `--code` runs another checkout of fang (e.g. the base commit) to
measure a "before". tests/test_badinput_sweep.py runs it and requires every case to be clear or
handled. The tiny project's helpers live in the checkout's tests/ (conftest, helpers_*).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"  # the tiny model, tokenizer and project helpers the test suite shares


@dataclass
class Case:
    name: str
    argv: list[str]
    expect: list[str]  # every keyword must appear (case-insensitive) in the one stderr line
    setup: Callable[[Path], None] | None = None
    outputs: list[str] = field(default_factory=list)  # removed before the run; must not exist after
    env: dict[str, str] = field(default_factory=dict)
    interrupt: int | None = None  # signal sent while the stage blocks reading a FIFO params file
    then: list[list[str]] = field(default_factory=list)  # more commands in the same copy, each judged alike
    ok: bool = False  # the command must succeed ("handled"): a rerun, a stale lock taken over


@dataclass
class Result:
    name: str
    verdict: str
    returncode: int
    stderr_tail: str
    leftovers: list[str]


# ------------------------------------------------------------------------------------------- project


def _env(code: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(code), "FANG_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONWARNINGS": "ignore"}
    env.pop("FANG_DEVICE", None)
    env.pop("COLUMNS", None)
    env.update(extra or {})
    return env


def fang(code: Path, cwd: Path, *argv: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fang.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          env=_env(code, env), **kw)


def build_project(code: Path, root: Path, server: "ForkServer | None" = None) -> None:
    """A tiny project whose every artifact was made by the CLI under test, with the pipelines' dvc.yaml
    (each stage in a child of `server` when given, else in a `python -m fang.cli` of its own)."""
    sys.path.insert(0, str(TESTS))
    from conftest import tiny_model
    from helpers_tokenizer import tiny_tokenizer
    from helpers_project import tiny_params, write_bigbench, write_corpus

    root.mkdir(parents=True)
    model = tiny_model(6, 3, layers=3)
    model.save_pretrained(root / "tiny_model")
    tiny_tokenizer().save_pretrained(root / "tiny_model")
    write_corpus(root / "summaries.json")
    write_bigbench(root / "bigbench")
    params = tiny_params(root)
    params["prune"]["method"] = "f_fang"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "artifacts").mkdir()
    for pipeline in [code / "dvc.yaml", *sorted(code.glob("studies/*/dvc.yaml"))]:  # what stages own
        (root / pipeline.relative_to(code)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pipeline, root / pipeline.relative_to(code))
    for stage in ("fetch-model", "fetch-data", "calibrate", "capture", "cluster", "taylor", "group", "allocate", "prune"):
        if server is not None:
            rc, err = server.run(root, [stage], {})
        else:
            proc = fang(code, root, stage)
            rc, err = proc.returncode, proc.stderr
        if rc != 0:
            raise SystemExit(f"building the sweep project failed at `fang {stage}`:\n{err[-3000:]}")


# ------------------------------------------------------------------------------------------- edits


def params_edit(block: str, **values) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        params = yaml.safe_load((root / "params.yaml").read_text())
        params.setdefault(block, {}).update(values)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
    return edit


def params_set(key: str, value) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        params = yaml.safe_load((root / "params.yaml").read_text())
        params[key] = value
        (root / "params.yaml").write_text(yaml.safe_dump(params))
    return edit


def write(rel: str, text: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (root / rel).write_text(text)
    return edit


def remove(rel: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        p = root / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return edit


def truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        p = root / rel
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * keep)])
    return edit


def own_model(edit: Callable[[Path], None]) -> Callable[[Path], None]:
    """`edit`, with model.name pointing at this case's copy of the source model (not the golden one)."""
    def both_edits(root: Path) -> None:
        edit(root)
        params_edit("model", name=str(root / "tiny_model"))(root)
    return both_edits


def huge_header(rel: str) -> Callable[[Path], None]:
    """Overwrite a safetensors header length with a huge value ("header too large")."""
    def edit(root: Path) -> None:
        p = root / rel
        data = bytearray(p.read_bytes())
        data[:8] = struct.pack("<Q", 1 << 40)
        p.write_bytes(bytes(data))
    return edit


def flip_tail(rel: str) -> Callable[[Path], None]:
    """Corrupt bytes near the end of a file without changing its size."""
    def edit(root: Path) -> None:
        p = root / rel
        data = bytearray(p.read_bytes())
        for i in range(len(data) - 64, len(data) - 32):
            data[i] ^= 0x5A
        p.write_bytes(bytes(data))
    return edit


def chunk(root: Path, store: str, array: str, layer: int) -> Path:
    """The first chunk file of `array` at `layer` (chunk key c/<layer>/...)."""
    files = sorted(p for p in (root / store / array / "c" / str(layer)).rglob("*") if p.is_file())
    if not files:
        raise SystemExit(f"no chunk of {store}/{array} at layer {layer}")
    return files[0]


def chunk_edit(store: str, array: str, layer: int, how: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        p = chunk(root, store, array, layer)
        if how == "delete":
            p.unlink()
        elif how == "truncate":
            p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)])
        else:  # flip bytes in the middle, same size
            data = bytearray(p.read_bytes())
            mid = len(data) // 2
            for i in range(mid, min(len(data), mid + 16)):
                data[i] ^= 0xFF
            p.write_bytes(bytes(data))
    return edit


def non_llama(root: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=128, n_positions=64)).save_pretrained(root / "gpt2")
    params_edit("model", name=str(root / "gpt2"))(root)


def tamper_loader(root: Path) -> None:
    p = root / "artifacts/data/tasks/_fang_data.py"
    p.write_text(p.read_text() + "\nimport os  # injected\n")


def evil_yaml(root: Path) -> None:
    tasks = root / "artifacts/data/tasks"
    (tasks / "evil.py").write_text("def load(**kw):\n    raise SystemExit('pwned')\n")
    y = next(tasks.glob("bb_*.yaml"))
    y.write_text(y.read_text().replace("_fang_data.load", "evil.load"))


def own_bigbench(edit: Callable[[Path], None]) -> Callable[[Path], None]:
    """`edit`, with data.bigbench pointing at this case's copy of the BIG-bench folder (not the golden one)."""
    def both_edits(root: Path) -> None:
        edit(root)
        params_edit("data", bigbench=str(root / "bigbench"))(root)
    return both_edits


def both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        for e in edits:
            e(root)
    return edit


def mkdir(rel: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (root / rel).mkdir(parents=True, exist_ok=True)
    return edit


def copy(src: str, dst: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (shutil.copytree if (root / src).is_dir() else shutil.copy)(root / src, root / dst)
    return edit


def mkdir_with(rel: str, name: str = "keep.txt") -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / name).write_text("the user's own file\n")
    return edit


def json_edit(rel: str, **values) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        p = root / rel
        p.write_text(json.dumps({**json.loads(p.read_text()), **values}))
    return edit


def duplicate_key(block: str, key: str, value: str) -> Callable[[Path], None]:
    """The same key twice in one params block (YAML keeps the later one silently)."""
    def edit(root: Path) -> None:
        p = root / "params.yaml"
        p.write_text(p.read_text().replace(f"\n{block}:\n", f"\n{block}:\n  {key}: {value}\n", 1))
    return edit


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def lock(rel: str, live: bool) -> Callable[[Path], None]:
    """A lock beside `rel`, held by this (live) sweep process or by a process that is gone."""
    def edit(root: Path) -> None:
        (root / f"{rel}.lock").write_text(f"{os.getpid() if live else dead_pid()}\n")
    return edit


def loader_symlink(root: Path) -> None:
    """The task folder's loader as a symlink into a cache, as DVC's symlink cache mode leaves it."""
    loader = root / "artifacts/data/tasks/_fang_data.py"
    cache = root / "cache_fang_data.py"
    shutil.move(loader, cache)
    loader.symlink_to(cache)


def twin_bigbench_task(root: Path) -> None:
    shutil.copytree(root / "bigbench/tiny_mc", root / "bigbench/tiny-mc")
    params_edit("data", tasks=["tiny_mc", "tiny-mc", "next_sentence"], bigbench=str(root / "bigbench"))(root)


def strip_tokenizer(rel: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        for f in (root / rel).glob("tokenizer*"):
            f.unlink()
    return edit


# ------------------------------------------------------------------------------------------- cases

PRUNE_OUT = ["artifacts/pruned", "artifacts/metrics/prune.json"]
CLUSTER_OUT = ["artifacts/cluster.zarr", "artifacts/metrics/cluster.json"]
ALLOCATE_OUT = ["artifacts/allocate.json", "artifacts/block_sparsity.json", "artifacts/plots/block_sparsity.csv"]
EVAL_OUT = ["artifacts/metrics/pruned.json"]
EVAL = ["evaluate", "--model", "artifacts/pruned", "--out", "artifacts/metrics/pruned.json"]


def cases() -> list[Case]:
    c = Case
    return [
        # ---- destroying what the user has: each must refuse before any work and leave the tree as it was
        c("out_project_artifacts_model", ["prune", "--out", "."], ["--out", "would"], None, [],
          then=[["prune", "--out", "artifacts"], ["prune", "--out", "artifacts/model"]]),
        c("out_parent_of_project", ["prune", "--out", ".."], ["--out", "project folder"], None, []),
        c("out_project_spelled_long", ["prune", "--out", "./artifacts/.."], ["--out", "project folder"], None, []),
        c("out_artifacts_slash", ["prune", "--out", "artifacts/"], ["--out", "artifacts folder"], None, []),
        c("out_existing_file", ["prune", "--out", "artifacts/notes.txt"], ["notes.txt", "existing file"],
          write("artifacts/notes.txt", "my notes\n"), []),
        c("out_capture_store", ["prune", "--out", "artifacts/capture.zarr"], ["capture.zarr", "capture"], None, []),
        c("out_inside_pruned", ["prune", "--out", "artifacts/pruned/sub"], ["artifacts/pruned", "inside"], None, []),
        c("out_foreign_folder", ["prune", "--out", "mine"], ["mine", "not a pruned model"], mkdir_with("mine"), []),
        c("out_params_file", ["prune", "--out", "params.yaml"], ["params.yaml", "existing file"], None, []),
        c("out_bigbench_parent", ["prune", "--out", "bigbench"], ["bigbench", "not a pruned model"], None, []),
        c("out_sweep_folder", ["prune", "--out", "artifacts/sweep"], ["artifacts/sweep", "sweep_prune"],
          mkdir_with("artifacts/sweep"), []),
        c("out_empty", ["prune", "--out", ""], ["--out", "empty"], None, []),
        c("out_unwritable", ["prune", "--out", "/proc/fang-pruned"], ["--out", "cannot write"], None, []),
        c("out_under_a_file", ["prune", "--out", "params.yaml/pruned"], ["params.yaml", "file"], None, []),
        c("eval_out_model_config", ["evaluate", "--model", "artifacts/pruned", "--out", "artifacts/pruned/config.json"],
          ["--out", "artifacts/pruned"], None, []),
        c("eval_out_folder", ["evaluate", "--model", "artifacts/pruned", "--out", "artifacts/metrics"],
          ["artifacts/metrics"], None, []),
        c("eval_out_empty", ["evaluate", "--model", "artifacts/pruned", "--out", ""], ["--out", "empty"], None, []),
        c("eval_out_other_stage", ["evaluate", "--model", "artifacts/pruned", "--out", "artifacts/allocate.json"],
          ["allocate.json", "allocate"], None, []),
        c("eval_out_foreign_file", ["evaluate", "--model", "artifacts/pruned", "--out", "summaries.json"],
          ["summaries.json", "not an evaluation"], None, []),
        c("export_over_weights", ["export", "--gguf", "artifacts/pruned/model.safetensors", "--model", "artifacts/pruned"],
          ["--gguf", "artifacts/pruned"], None, []),
        c("export_to_folder", ["export", "--gguf", "artifacts/data"], ["--gguf", "artifacts/data"], None, []),
        c("export_empty", ["export", "--gguf", ""], ["--gguf", "empty"], None, []),
        c("export_unwritable", ["export", "--gguf", "/proc/fang.gguf"], ["--gguf", "cannot write"], None, []),
        c("export_foreign_file", ["export", "--gguf", "summaries.json"], ["summaries.json", "not a gguf"], None, []),
        c("png_project", ["inspect", "clusters", "--png", "."], ["--png", "project folder"], None, []),
        c("png_into_model", ["inspect", "clusters", "--png", "artifacts/model"], ["--png", "artifacts/model"], None, []),
        c("png_unwritable", ["inspect", "clusters", "--png", "/proc/fang-plots"], ["--png", "cannot write"], None, []),
        c("method_inputs_out_root", ["method-inputs", "--method", "flap", "--out", "."], ["--out", "project folder"],
          None, []),
        c("method_inputs_over_model", ["method-inputs", "--method", "flap", "--out", "artifacts/model/config.json"],
          ["artifacts/model", "fetch-model"], None, []),
        # ---- names are names
        c("source_dotdot_allocate", ["allocate", "--source", ".."], ["'..'", "not a name"],
          both(params_edit("bias", sources=["all", ".."]), mkdir("artifacts/bias")), []),
        c("source_dotdot_cluster", ["cluster", "--source", ".."], ["--source", "'..'", "not a name"],
          both(params_edit("bias", sources=["all", ".."]), mkdir("artifacts/bias")), []),
        c("source_dotdot_prune", ["prune", "--source", ".."], ["--source", "'..'", "not a name"],
          both(params_edit("bias", sources=["all", ".."]), mkdir("artifacts/bias")), []),
        c("source_with_slash", ["capture", "--source", "all/../.."], ["--source", "not a name"], None, []),
        c("bias_sources_dotdot", ["calibrate", "--source", "all"], ["bias.sources", "'..'"],
          params_edit("bias", sources=["all", ".."]), ["artifacts/bias"]),
        c("topics_path", ["calibrate"], ["calibrate.topics", "not a name"], params_edit("calibrate", topics=["../People"]),
          ["artifacts/calib"]),
        c("task_path", ["fetch-data"], ["data.tasks", "not a name"], params_edit("data", tasks=["../tiny_mc"]),
          ["artifacts/data"]),
        c("task_not_string", ["fetch-data"], ["data.tasks", "5"], params_edit("data", tasks=[5]), ["artifacts/data"]),
        c("task_prefix_not_text", ["fetch-data"], ["tiny_mc", "task_prefix"], own_bigbench(json_edit("bigbench/tiny_mc/task.json", task_prefix=7)),
          ["artifacts/data"]),
        c("task_names_collide", ["fetch-data"], ["tiny-mc", "bb_tiny_mc"], twin_bigbench_task, ["artifacts/data"]),
        # ---- one writer at a time
        c("second_writer", ["prune"], ["being written", "pid"], lock("artifacts/pruned", live=True), PRUNE_OUT),
        c("stale_lock_taken_over", ["prune"], [], lock("artifacts/pruned", live=False), PRUNE_OUT, ok=True),
        c("rerun_over_own_output", ["prune", "--out", "artifacts/again"], [], copy("artifacts/pruned", "artifacts/again"),
          ["artifacts/again", "artifacts/again.prune.json"], ok=True),
        # ---- strict grammar
        c("variant_two_allocations", ["prune", "--method", "obc+fc+uniform"], ["obc+fc+uniform", "two allocations"],
          None, PRUNE_OUT),
        c("variant_two_compensations", ["prune", "--method", "o_fang+group+layer"], ["two compensations"], None, PRUNE_OUT),
        c("variant_part_twice", ["prune", "--method", "obc+fc+fc"], ["obc+fc+fc", "two allocations"], None, PRUNE_OUT),
        c("variant_out_of_order", ["prune", "--method", "o_fang+layer+fc"], ["o_fang+fc+layer"], None, PRUNE_OUT),
        c("variant_trailing_plus", ["prune", "--method", "obc+"], ["obc+", "empty part"], None, PRUNE_OUT),
        c("method_empty", ["prune", "--method", ""], ["method", "empty"], None, PRUNE_OUT),
        c("yaml_duplicate_key", ["prune"], ["sparsity", "twice"], duplicate_key("prune", "sparsity", "0.5"), PRUNE_OUT),
        c("sweep_sparsity_bool", ["allocate"], ["sweep.sparsities", "False"], params_edit("sweep", sparsities=[False, 0.3]),
          ALLOCATE_OUT),
        c("sweep_sparsity_twice", ["allocate"], ["sweep.sparsities", "0.3"], params_edit("sweep", sparsities=[0.3, 0.3]),
          ALLOCATE_OUT),
        c("sweep_method_twice", ["allocate"], ["sweep.methods", "flap"], params_edit("sweep", methods=["flap", "flap"]),
          ALLOCATE_OUT),
        c("params_is_folder", ["cluster", "--params", "artifacts"], ["artifacts", "folder"], None, CLUSTER_OUT),
        # ---- tracebacks that must be one line
        c("model_is_a_file", ["evaluate", "--model", "params.yaml", "--out", "artifacts/metrics/x.json"],
          ["params.yaml"], None, ["artifacts/metrics/x.json"]),
        c("pruned_without_tokenizer", EVAL, ["tokenizer"], strip_tokenizer("artifacts/pruned"), EVAL_OUT),
        c("loader_symlink", EVAL, [], loader_symlink, EVAL_OUT, ok=True),
        c("dense_config_more_layers", ["capture"], ["config.json", "layers"],
          json_edit("artifacts/model/config.json", num_hidden_layers=5), ["artifacts/capture.zarr"]),
        c("capture_batch_huge", ["capture"], [], params_edit("capture", batch_size=10**9), ["artifacts/capture.zarr"],
          ok=True),  # a batch never holds more than every sequence: the memory check and the run use that
        c("capture_batch_memory", ["capture"], ["capture.batch_size", "memory"],
          params_edit("capture", batch_size=4), ["artifacts/capture.zarr"],
          env={"FANG_MEMORY_MIB": "0.1"}),
        c("dense_intermediate_edited", ["capture"], ["config.json", "gate_proj"],
          json_edit("artifacts/model/config.json", intermediate_size=40), ["artifacts/capture.zarr"]),
        c("hidden_not_multiple_of_heads", EVAL, ["hidden_size", "num_attention_heads"],
          json_edit("artifacts/pruned/config.json", hidden_size=25, head_dim=None), EVAL_OUT),
        c("model_name_is_pruned", ["fetch-model"], ["model.name", "pruned"],
          params_edit("model", name="artifacts/pruned"), []),
        c("attribute_top_k_huge", ["attribute"], ["attribute.top_k", "memory"], params_edit("attribute", top_k=10**9),
          ["artifacts/attribution.zarr", "artifacts/attribution.json"]),
        c("gprune_n_modules_huge", ["gprune-modules"], ["gprune.n_modules", "neurons"],
          params_edit("gprune", n_modules=10**6), ["artifacts/gprune.zarr", "artifacts/metrics/gprune.json"]),
        c("tokenizer_pre_unknown", ["export", "--gguf", "x.gguf", "--tokenizer-pre", "nope"], ["tokenizer-pre", "nope"],
          None, ["x.gguf"]),
        # params
        c("sparsity_one", ["prune"], ["prune.sparsity", "range"], params_edit("prune", sparsity=1.0), PRUNE_OUT),
        c("sparsity_override", ["prune", "--sparsity", "1.5"], ["sparsity", "1.5"], None, PRUNE_OUT),
        c("method_unknown", ["prune"], ["prune.method", "nope"], params_edit("prune", method="nope"), PRUNE_OUT),
        c("method_override", ["prune", "--method", "nope"], ["method", "nope"], None, PRUNE_OUT),
        c("sparsity_wrong_type", ["prune"], ["prune.sparsity", "type"], params_edit("prune", sparsity="abc"), PRUNE_OUT),
        c("unknown_inner_key", ["prune"], ["sparsty"], params_edit("prune", sparsty=0.3), PRUNE_OUT),
        c("unknown_top_block", ["prune"], ["prunes"], params_set("prunes", {"sparsity": 0.5}), PRUNE_OUT),
        c("unknown_top_block_cluster", ["cluster"], ["clusters"], params_set("clusters", {"k": 3}), CLUSTER_OUT),
        c("params_not_yaml", ["cluster"], ["yaml"], write("params.yaml", "prune: [unclosed\n"), CLUSTER_OUT),
        c("params_missing", ["cluster", "--params", "nope.yaml"], ["nope.yaml"], None, CLUSTER_OUT),
        c("params_not_mapping", ["cluster"], ["mapping"], write("params.yaml", "- a\n- b\n"), CLUSTER_OUT),
        c("topics_null", ["calibrate"], ["calibrate.topics"], params_edit("calibrate", topics=None), ["artifacts/calib"]),
        c("topics_unknown", ["calibrate"], ["Nowhere"], params_edit("calibrate", topics=["Nowhere"]), ["artifacts/calib"]),
        c("seq_len_above_model", ["calibrate"], ["seq_len", "max_position_embeddings"],
          params_edit("calibrate", seq_len=300, n_samples=1), ["artifacts/calib"]),
        c("n_samples_too_many", ["calibrate"], ["corpus too small"], params_edit("calibrate", n_samples=5000), ["artifacts/calib"]),
        c("bias_source_unknown", ["calibrate", "--source", "Nowhere"], ["Nowhere", "bias.sources"], None, ["artifacts/bias"]),
        c("model_dtype", ["fetch-model"], ["model.dtype"], params_edit("model", dtype="float8"), ["artifacts/model"]),
        c("model_path_missing", ["fetch-model"], ["model path not found"], params_edit("model", name="./no_such_model"),
          ["artifacts/model"]),
        c("capture_dtype", ["capture"], ["capture.dtype"], params_edit("capture", dtype="int8"), ["artifacts/capture.zarr"]),
        c("pca_dim_too_big", ["cluster"], ["cluster.pca_dim"], params_edit("cluster", pca_dim=10000), CLUSTER_OUT),
        c("k_above_tokens", ["cluster"], ["cluster.k"], params_edit("cluster", k=100000), CLUSTER_OUT),
        c("k_needs_too_much_memory", ["cluster"], ["cluster.k", "memory"], params_edit("cluster", k=100), CLUSTER_OUT,
          env={"FANG_MEMORY_MIB": "1"}),
        c("max_sparsity", ["allocate"], ["allocate.max_sparsity"], params_edit("allocate", max_sparsity=1.5),
          ["artifacts/allocate.json"]),
        c("group_method", ["group"], ["group.method"], params_edit("group", method="greedy"), ["artifacts/groups.zarr"]),
        c("task_limit_negative", EVAL, ["evaluate.task_limit"], params_edit("evaluate", task_limit=-2), EVAL_OUT),  # -1 = perplexity only
        c("data_task_unknown", ["fetch-data"], ["no_such_task"], params_edit("data", tasks=["no_such_task"]), ["artifacts/data"]),
        # devices
        c("device_gpu", ["cluster"], ["FANG_DEVICE", "gpu"], None, CLUSTER_OUT, env={"FANG_DEVICE": "gpu"}),
        c("device_cuda_absent", ["cluster"], ["FANG_DEVICE", "cuda"], None, CLUSTER_OUT, env={"FANG_DEVICE": "cuda"}),
        # dense model files
        c("dense_truncated", ["capture"], ["model.safetensors"], truncate("artifacts/model/model.safetensors"),
          ["artifacts/capture.zarr"]),
        c("dense_header_too_large", ["capture"], ["model.safetensors", "header"], huge_header("artifacts/model/model.safetensors"),
          ["artifacts/capture.zarr"]),
        c("fetch_truncated", ["fetch-model"], ["model.safetensors"], own_model(truncate("tiny_model/model.safetensors")),
          ["artifacts/model"]),
        c("fetch_header_too_large", ["fetch-model"], ["model.safetensors", "header"], own_model(huge_header("tiny_model/model.safetensors")),
          ["artifacts/model"]),
        c("dense_config_not_json", ["capture"], ["config.json"], write("artifacts/model/config.json", "{oops"),
          ["artifacts/capture.zarr"]),
        c("non_llama", ["fetch-model"], ["model type", "gpt2"], non_llama, ["artifacts/model"]),
        # pruned model files
        c("pruned_truncated", EVAL, ["model.safetensors"], truncate("artifacts/pruned/model.safetensors"), EVAL_OUT),
        c("pruned_header_too_large", EVAL, ["model.safetensors", "header"], huge_header("artifacts/pruned/model.safetensors"),
          EVAL_OUT),
        c("pruned_bytes_flipped", EVAL, ["model.safetensors", "checksum"], flip_tail("artifacts/pruned/model.safetensors"),
          EVAL_OUT),
        c("pruned_structure_not_json", EVAL, ["structure.json"], write("artifacts/pruned/structure.json", "{"), EVAL_OUT),
        c("pruned_missing", ["evaluate", "--model", "artifacts/nothing", "--out", "artifacts/metrics/x.json"],
          ["artifacts/nothing"], None, ["artifacts/metrics/x.json"]),
        # zarr stores
        # (the slim capture store keeps the PCA-projected MLP inputs and the token ids, not full activations)
        c("ffn_proj_chunk_truncated", ["cluster"], ["ffn_proj", "layer 1"],
          chunk_edit("artifacts/capture.zarr", "ffn_proj", 1, "truncate"), CLUSTER_OUT),
        c("ffn_proj_chunk_deleted", ["cluster"], ["ffn_proj", "layer 1"],
          chunk_edit("artifacts/capture.zarr", "ffn_proj", 1, "delete"), CLUSTER_OUT),
        c("ffn_proj_chunk_flipped", ["cluster"], ["ffn_proj", "layer 1"],
          chunk_edit("artifacts/capture.zarr", "ffn_proj", 1, "flip"), CLUSTER_OUT),
        c("token_ids_chunk_deleted", ["prune"], ["token_ids"], chunk_edit("artifacts/capture.zarr", "token_ids", 0, "delete"),
          PRUNE_OUT),
        c("pca_chunk_deleted", ["cluster"], ["pca_components"],
          chunk_edit("artifacts/capture.zarr", "pca_components", 0, "delete"), CLUSTER_OUT),
        c("scores_chunk_deleted", ["group"], ["scores", "layer 1"], chunk_edit("artifacts/taylor.zarr", "scores", 1, "delete"),
          ["artifacts/groups.zarr"]),
        c("capture_missing", ["cluster"], ["capture"], remove("artifacts/capture.zarr"), CLUSTER_OUT),
        c("capture_meta_not_json", ["cluster"], ["zarr.json"], write("artifacts/capture.zarr/zarr.json", "{oops"), CLUSTER_OUT),
        c("calib_truncated", ["capture"], ["calib.safetensors"], truncate("artifacts/calib/calib.safetensors"),
          ["artifacts/capture.zarr"]),
        c("allocate_not_json", ["prune"], ["allocate.json"], write("artifacts/allocate.json", "{oops"), PRUNE_OUT),
        # evaluation task folder
        c("loader_tampered", EVAL, ["_fang_data.py"], tamper_loader, EVAL_OUT),
        c("yaml_function_hook", EVAL, ["evil"], evil_yaml, EVAL_OUT),
        # interrupts
        c("sigint", ["cluster", "--params", "fifo.yaml"], ["interrupted"], None, CLUSTER_OUT, interrupt=signal.SIGINT),
        c("sigterm", ["cluster", "--params", "fifo.yaml"], ["interrupted"], None, CLUSTER_OUT, interrupt=signal.SIGTERM),
    ]


# ------------------------------------------------------------------------------------------- running

# What a command may change besides its declared outputs: the log of stage timings of a successful run.
ALWAYS_ALLOWED = ("artifacts/timings.jsonl",)


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file and symlink under `root`, by path, with a hash of its content (or link target)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "link:" + os.readlink(path)
            else:
                found[rel] = hashlib.sha1(path.read_bytes()).hexdigest()
    return found


def _under(rel: str, outputs: list[str]) -> bool:
    """`rel` is one of `outputs`, inside one, or the lock beside one (`<output>.lock`: the writer's own)."""
    return any(rel in (o, o + ".lock") or rel.startswith(o.rstrip("/") + "/") for o in outputs)


def changed_outside(before: dict[str, str], after: dict[str, str], outputs: list[str]) -> list[str]:
    """Paths outside `outputs` that were added, removed or rewritten."""
    keys = set(before) | set(after)
    return sorted(k for k in keys if before.get(k) != after.get(k) and not _under(k, [*outputs, *ALWAYS_ALLOWED]))


def _leftovers(root: Path, outputs: list[str], succeeded: bool, before: set[str]) -> list[str]:
    """The outputs of a failed command, and every new temp, lock or probe (those that were there before excepted)."""
    left = [] if succeeded else [o for o in outputs if (root / o).exists()]
    for p in root.rglob("*"):
        rel = str(p.relative_to(root))
        if rel not in before and (".tmp" in p.name or p.name.endswith(".lock") or p.name.startswith(".fang-probe")):
            left.append(rel)
    return left


class ForkServer:
    """One python that imported the fang under test once; each command runs in a child forked from it.

    A child is the CLI as `python -m fang.cli` runs it (same `main()`, argv, cwd, environment,
    stderr file, exit handlers), minus the seconds of importing torch, transformers and zarr.
    """

    SCRIPT = r"""
import atexit, importlib, json, os, sys, traceback
sys.argv = ["fang"]
import fang.cli as cli
for name in ("prune", "evaluate", "calibrate", "capture", "cluster", "taylor", "group", "allocate", "fetch_data",
             "fetch_model", "method_inputs", "compare_precision", "attribute", "gprune_modules", "report"):
    try:
        importlib.import_module("stages." + name)
    except Exception:
        pass
for name in ("lm_eval", "fang.evaluation.evaluate", "fang.model.export_gguf", "fang.tools.inspection.cli"):
    try:
        importlib.import_module(name)
    except Exception:
        pass
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if "warm" in req:
        # run commands here, in the server (their outcome is not judged): what a first command imports
        # and sets up lazily is then inherited by every child instead of costing each about a second
        os.chdir(req["cwd"])
        saved = os.dup(1), os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        own = []  # exit handlers fang registers (locks, temps); libraries' own, registered on import, are fine
        register = atexit.register
        def recording(func, *args, **kwargs):
            if getattr(func, "__module__", "").split(".")[0] in ("fang", "stages", "shutil", "os", "posix"):
                own.append(getattr(func, "__qualname__", repr(func)))
            return register(func, *args, **kwargs)
        atexit.register = recording
        try:
            for argv in req["warm"]:
                try:
                    cli.main(argv)
                except BaseException:
                    pass
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in (null, *saved):
                os.close(fd)
            os.chdir(os.path.dirname(os.path.abspath(cli.__file__)))
            atexit.register = register
        # a warm-up command that left an exit handler (a lock, a temp) would run it in every child
        print(json.dumps({"warm": not own, "own": own}), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(req["cwd"])
            for k in req["unset"]:
                os.environ.pop(k, None)
            os.environ.update(req["env"])
            err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            out = os.open(os.devnull, os.O_WRONLY)
            os.dup2(err, 2)
            os.dup2(out, 1)
            sys.argv = ["fang", *req["argv"]]
            try:
                cli.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
            try:
                atexit._run_exitfuncs()  # what a real exit runs (locks released, temps removed)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""

    def __init__(self, code: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT], cwd=code, env=_env(code), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._read(600)

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise TimeoutError("sweep fork server gave no answer")
        return json.loads(line)

    def run(self, cwd: Path, argv: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
        unset = ["FANG_DEVICE", "COLUMNS"]
        with tempfile.NamedTemporaryFile("r", suffix=".stderr") as err:
            self.proc.stdin.write(json.dumps({"cwd": str(cwd), "argv": argv, "env": env, "unset": unset,
                                              "stderr": err.name}) + "\n")
            self.proc.stdin.flush()
            pid = self._read(60)["pid"]
            try:
                rc = self._read(timeout)["rc"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                rc = self._read(60)["rc"]
            return rc, Path(err.name).read_text()

    def warm(self, cwd: Path, commands: list[list[str]], timeout: float = 600) -> None:
        """Run `commands` in the server itself (in `cwd`, output discarded) before forking children from it."""
        self.proc.stdin.write(json.dumps({"warm": commands, "cwd": str(cwd)}) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout)
        if not answer["warm"]:
            raise SystemExit(f"a warm-up command left exit handlers {answer['own']} in the sweep's fork server: {commands}")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _interrupted_run(code: Path, root: Path, case: Case) -> tuple[int, str]:
    fifo = root / "fifo.yaml"
    os.mkfifo(fifo)
    # a sweep started in the background (`&`) passes SIGINT on as ignored: give the stage the default back
    proc = subprocess.Popen([sys.executable, "-m", "fang.cli", *case.argv], cwd=root, env=_env(code, case.env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    deadline, fd = time.time() + 120, None
    while fd is None and time.time() < deadline and proc.poll() is None:
        try:  # succeeds once the stage has opened the FIFO for reading: it now blocks in read()
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(case.interrupt)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        err += "\n(sweep: no exit within 60 s of the signal; killed)"
    finally:
        if fd is not None:
            os.close(fd)
    fifo.unlink()
    return proc.returncode, err


def judge(case: Case, returncode: int, stderr: str, changed: list[str], leftovers: list[str]) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    if "Traceback" in stderr:
        return "traceback"
    if changed:
        return "changed"
    if case.ok:
        return ("handled" if not leftovers else "left") if returncode == 0 else "unclear"
    if returncode == 0:
        return "silent"
    if leftovers:
        return "left"
    named = len(lines) == 1 and all(k.lower() in lines[0].lower() for k in case.expect)
    return "clear" if named and returncode > 0 else "unclear"


def run_case(code: Path, golden: Path, work: Path, case: Case, server: ForkServer | None) -> Result:
    # one level down: a case that writes `..` (a regression of the guard) can only empty its own folder
    root = work / case.name / "project"
    shutil.rmtree(root.parent, ignore_errors=True)  # a previous sweep that was stopped midway
    shutil.copytree(golden, root, symlinks=True)
    if case.setup:
        case.setup(root)
    for o in case.outputs:
        p = root / o
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    before = tree_hashes(root)
    present = {str(p.relative_to(root)) for p in root.rglob("*")}
    verdicts, rc, err, changed, left = [], 0, "", [], []
    for argv in [case.argv, *case.then]:
        if case.interrupt is not None:
            rc, err = _interrupted_run(code, root, case)
        elif server is not None:
            rc, err = server.run(root, argv, case.env)
        else:
            proc = fang(code, root, *argv, env=case.env, timeout=600)
            rc, err = proc.returncode, proc.stderr
        changed = changed_outside(before, tree_hashes(root), case.outputs)
        left = _leftovers(root, case.outputs, rc == 0, present)
        verdicts.append(judge(case, rc, err, changed, left))
        if verdicts[-1] not in ("clear", "handled"):
            break
    verdict = next((v for v in verdicts if v not in ("clear", "handled")), verdicts[-1])
    result = Result(case.name, verdict, rc, err.strip()[-600:], left + [f"changed: {c}" for c in changed[:5]])
    shutil.rmtree(root.parent, ignore_errors=True)
    return result


VERDICTS = ("clear", "handled", "traceback", "silent", "changed", "left", "unclear")


def summarize(results: list[Result]) -> dict:
    return {"cases": len(results), **{v: sum(r.verdict == v for r in results) for v in VERDICTS}}


# Commands the fork server runs in itself before the cases, each refused before it writes anything: the
# CLI's and the stages' first-call setup (lazy imports, typer's command tables) is then done once.
WARM_UP = [["prune", "--out", ""], ["evaluate", "--model", "artifacts/pruned", "--out", ""], ["export", "--gguf", ""],
           ["inspect", "clusters", "--png", "."], ["cluster", "--params", "nope.yaml"], ["calibrate", "--source", "a/b"],
           ["method-inputs", "--method", "flap", "--out", "."], ["fetch-model", "--params", "nope.yaml"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", default=str(REPO), help="fang checkout to run (PYTHONPATH)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir, removed after)")
    ap.add_argument("--json", default=None, help="write per-case results and counts here")
    ap.add_argument("--only", default=None, help="comma-separated case names")
    ap.add_argument("--spawn", action="store_true", help="one `python -m fang.cli` process per case (slower)")
    args = ap.parse_args(argv)
    code = Path(args.code).resolve()
    selected = cases()
    if args.only:
        wanted = set(args.only.split(","))
        selected = [c for c in selected if c.name in wanted]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fang-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        golden = work / "_golden"
        server = None if args.spawn else ForkServer(code)
        if not golden.exists():
            build_project(code, golden, server)
        if server is not None:
            warm = work / "_warm" / "project"
            shutil.rmtree(warm.parent, ignore_errors=True)
            shutil.copytree(golden, warm, symlinks=True)
            server.warm(warm, WARM_UP)
            shutil.rmtree(warm.parent, ignore_errors=True)
        results = []
        for case in selected:
            r = run_case(code, golden, work, case, server)
            results.append(r)
            last = r.stderr_tail.splitlines()[-1:] or [""]
            print(f"{r.verdict:9} {r.name:28} rc={r.returncode:<4} {last[0][:150]}"
                  + (f" LEFT {r.leftovers}" if r.leftovers else ""), flush=True)
        summary = summarize(results)
        print(json.dumps(summary))
        if args.json:
            Path(args.json).write_text(json.dumps({"code": str(code), "summary": summary,
                                                   "results": [r.__dict__ for r in results]}, indent=1))
    finally:
        if server is not None:
            server.close()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["clear"] + summary["handled"] == summary["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
