"""Bad-input sweep: throw many kinds of bad input and interruption at the real `fang` CLI.

Every case runs `python -m fang.cli ...` in a fresh copy of a tiny project (3-layer random LLaMA,
character tokenizer, 72-article corpus, every artifact built by the CLI itself) and is judged:

- clear: non-zero exit, stderr is exactly one line and it names the problem (the case's keywords),
  no traceback, nothing left at the command's output paths nor any `*.tmp*` path;
- traceback: stderr holds a Python traceback;
- silent: exit status 0 (the bad input was accepted);
- unclear: anything else (several lines, a message that does not name the problem, a leaked temp,
  death by signal).

    python tests/badinput_sweep.py [--code DIR] [--work DIR] [--json FILE] [--only NAME,...]

`--code` runs another checkout of fang (e.g. the base commit) to measure a "before".
tests/test_badinput_sweep.py runs it and requires every case to be clear.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@dataclass
class Case:
    name: str
    argv: list[str]
    expect: list[str]  # every keyword must appear (case-insensitive) in the one stderr line
    setup: Callable[[Path], None] | None = None
    outputs: list[str] = field(default_factory=list)  # removed before the run; must not exist after
    env: dict[str, str] = field(default_factory=dict)
    interrupt: int | None = None  # signal sent while the stage blocks reading a FIFO params file


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


def build_project(code: Path, root: Path) -> None:
    """A tiny project whose every artifact was made by the CLI under test."""
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
    for stage in ("fetch-model", "fetch-data", "calibrate", "capture", "cluster", "taylor", "group", "allocate", "prune"):
        proc = fang(code, root, stage)
        if proc.returncode != 0:
            raise SystemExit(f"building the sweep project failed at `fang {stage}`:\n{proc.stderr[-3000:]}")


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


def both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        for e in edits:
            e(root)
    return edit


# ------------------------------------------------------------------------------------------- cases

PRUNE_OUT = ["artifacts/pruned", "artifacts/metrics/prune.json"]
CLUSTER_OUT = ["artifacts/cluster.zarr", "artifacts/metrics/cluster.json"]
EVAL_OUT = ["artifacts/metrics/pruned.json"]
EVAL = ["evaluate", "--model", "artifacts/pruned", "--out", "artifacts/metrics/pruned.json"]


def cases() -> list[Case]:
    c = Case
    return [
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


def _leftovers(root: Path, outputs: list[str]) -> list[str]:
    left = [o for o in outputs if (root / o).exists()]
    left += [str(p.relative_to(root)) for p in (root / "artifacts").rglob("*") if ".tmp" in p.name]
    return left


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


def judge(case: Case, returncode: int, stderr: str, leftovers: list[str]) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    if "Traceback" in stderr:
        return "traceback"
    if returncode == 0:
        return "silent"
    named = len(lines) == 1 and all(k.lower() in lines[0].lower() for k in case.expect)
    return "clear" if named and not leftovers and returncode > 0 else "unclear"


def run_case(code: Path, golden: Path, work: Path, case: Case) -> Result:
    root = work / case.name
    shutil.rmtree(root, ignore_errors=True)  # a previous sweep that was stopped midway
    shutil.copytree(golden, root, symlinks=True)
    if case.setup:
        case.setup(root)
    for o in case.outputs:
        p = root / o
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    if case.interrupt is not None:
        rc, err = _interrupted_run(code, root, case)
    else:
        proc = fang(code, root, *case.argv, env=case.env, timeout=600)
        rc, err = proc.returncode, proc.stderr
    left = _leftovers(root, case.outputs)
    result = Result(case.name, judge(case, rc, err, left), rc, err.strip()[-600:], left)
    shutil.rmtree(root, ignore_errors=True)
    return result


def summarize(results: list[Result]) -> dict:
    counts = {v: sum(r.verdict == v for r in results) for v in ("clear", "traceback", "silent", "unclear")}
    return {"cases": len(results), **counts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", default=str(HERE.parent), help="fang checkout to run (PYTHONPATH)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir, removed after)")
    ap.add_argument("--json", default=None, help="write per-case results and counts here")
    ap.add_argument("--only", default=None, help="comma-separated case names")
    args = ap.parse_args(argv)
    code = Path(args.code).resolve()
    selected = cases()
    if args.only:
        wanted = set(args.only.split(","))
        selected = [c for c in selected if c.name in wanted]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fang-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        golden = work / "_golden"
        if not golden.exists():
            build_project(code, golden)
        results = []
        for case in selected:
            r = run_case(code, golden, work, case)
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
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["clear"] == summary["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
