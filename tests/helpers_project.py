"""A tiny fang project on disk (tiny model, corpus, BIG-bench task, params) and running dvc in it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import tiny_model
from helpers_tokenizer import tiny_tokenizer

SWEEP_FILE, BIAS_FILE = "studies/sweep/dvc.yaml", "studies/bias/dvc.yaml"
ROOT = Path(__file__).resolve().parents[1]
TOPICS = ("People", "Geography", "Mathematics")


def write_corpus(path: Path) -> None:
    words = {"People": "born king poet queen painter", "Geography": "river mountain city coast lake",
             "Mathematics": "number prime proof theorem graph"}
    arts = {}
    for t in TOPICS:
        vocab = words[t].split()
        for i in range(24):
            sents = [f"The {vocab[(i + j) % 5]} {j} is {vocab[(i * j) % 5]}." for j in range(4)]
            arts[f"{t} {i}"] = {"title": f"{t} {i}", "extract": " ".join(sents), "topic": t}
    path.write_text(json.dumps(arts))


def write_bigbench(folder: Path) -> None:
    task = folder / "tiny_mc"
    task.mkdir(parents=True)
    examples = [{"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1)}} for i in range(12)]
    (task / "task.json").write_text(json.dumps({"name": "tiny_mc", "description": "parity", "examples": examples}))


def tiny_params(root: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["name"] = str(root / "tiny_model")
    params["data"].update(corpus=str(root / "summaries.json"), bigbench=str(root / "bigbench"),
                          tasks=["tiny_mc", "next_sentence"], next_sentence_per_topic=4, test_fraction=0.3)
    params["calibrate"].update(n_samples=4, seq_len=32)
    params["capture"]["batch_size"] = 2
    params["prune"].update(sparsity=0.3, batch_size=2)
    params["evaluate"].update(ppl_seq_len=32, ppl_max_windows_per_topic=2, task_limit=4, batch_size=4)
    params["cluster"].update(k=3, pca_dim=8)
    params["taylor"]["batch_size"] = 2
    # ica_fn_ranked, not ica_fn: the faithful mode keeps 5 edge blocks dense and the tiny model has 3
    params["sweep"].update(methods=["flap", "f_fang", "ica_fn_ranked", "gprune"], sparsities=[0.3], task_limit=4)
    params["bias"].update(sources=["all", "Mathematics"], n_samples=3, seq_len=32, methods=["f_fang", "gprune"],
                          sparsities=[0.3], task_limit=4)
    params["ica"].update(n_components=4, n_restarts=1)
    params["gprune"].update(min_source_tokens=16, n_modules=3)
    params["recipe"].update(analyses=[])  # the real study's variants (k=10, 128 x 512 tokens) do not fit the tiny model
    return params


def dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "FANG_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    started, cpu = time.time(), os.times()
    proc = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True, env=env)
    if os.environ.get("FANG_TEST_DVC_LOG"):  # where the end-to-end tests spend their time (docs/testing.md)
        done = os.times()
        with open(os.environ["FANG_TEST_DVC_LOG"], "a") as log:
            log.write(json.dumps({"args": args, "wall_s": round(time.time() - started, 1),
                                  "cpu_s": round(done.children_user + done.children_system - cpu.children_user
                                                 - cpu.children_system, 1),
                                  "ran": sorted(stage_names(proc.stdout))}) + "\n")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def make_project(root: Path) -> Path:
    """The code, every dvc.yaml and tiny inputs under `root` (no `dvc init`: callers choose with or without git)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("fang", "stages"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    for study in (SWEEP_FILE, BIAS_FILE):
        (root / study).parent.mkdir(parents=True)
        shutil.copy(ROOT / study, root / study)
    model = tiny_model(6, 3, layers=3)
    model.save_pretrained(root / "tiny_model")
    tiny_tokenizer().save_pretrained(root / "tiny_model")
    write_corpus(root / "summaries.json")
    write_bigbench(root / "bigbench")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(root)))
    return root


def stage_names(text: str) -> set[str]:
    """Stages a `dvc repro` output says it ran; those of studies/*/dvc.yaml are printed as
    "studies/sweep/dvc.yaml:sweep_prune@flap-0.3"."""
    return {name.rpartition(":")[2] for name in re.findall(r"Running stage '([^']+)'", text)}


def build_main_job(root: Path) -> tuple[Path, set[str]]:
    """The tiny project (no git) after one `dvc repro` of the main job, and the stages that run ran."""
    make_project(root)
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    return root, stage_names(dvc(root, "repro"))


def copy_project(src: Path, dst: Path) -> Path:
    """A copy of a built project (artifacts, DVC cache and dvc.lock: up to date as the original), without
    DVC's machine-local state. params.yaml keeps pointing at the original's tiny model and inputs, which
    the tests only read."""
    shutil.copytree(src, dst, symlinks=True, ignore=lambda d, names: ["tmp"] if Path(d) == src / ".dvc" else [])
    return dst
