"""A tiny fang project on disk and every stage that runs the model, for the model.offload tests
(tests/test_stream_all.py): the same stages with model.offload none and disk must write the same
results, and with disk the whole pipeline must run under a memory cap smaller than the model.

Not a test module: the memory-capped test runs `build` and `run_pipeline` in a subprocess.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

TOPICS = ("People", "Geography", "Mathematics")
SOURCE = "source"  # the dense checkpoint as a user has it (model.name); fetch_model writes artifacts/model from it


def model_config(layers: int, hidden: int = 48, ffn: int = 64, heads: int = 6, kv_heads: int = 3):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                       max_position_embeddings=256, tie_word_embeddings=False)


def build(root: Path, layers: int, hidden: int = 48, ffn: int = 64, heads: int = 6, kv_heads: int = 3,
          shard_bytes: int | None = None, seed: int = 0) -> Path:
    """A project folder: a random LLaMA in `source/` (saved in shards of at most `shard_bytes` when given, as big
    checkpoints come; fetch_model copies it to artifacts/model), a three-topic corpus (train and test splits), a tiny
    BIG-bench folder and the task folder built from it."""
    import torch
    from transformers import LlamaForCausalLM

    from fang.data.tasks import build_task_folder
    from helpers_tokenizer import tiny_tokenizer

    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(layers, hidden, ffn, heads, kv_heads)).eval()
    with torch.no_grad():  # random init is near zero: widen it so pruning decisions are visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    art = root / "artifacts"
    kw = {} if shard_bytes is None else {"max_shard_size": shard_bytes}
    model.save_pretrained(root / SOURCE, **kw)
    tiny_tokenizer().save_pretrained(root / SOURCE)
    del model
    rows = [{"id": f"{t} {i}", "title": f"{t} {i}", "topic": t,
             "text": f"The {t.lower()} number {i} is {'ab' * (i % 5)} and {t[:3]} {i * 7}. Then {i} more. End {t}."}
            for t in TOPICS for i in range(12)]
    (art / "data").mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows), ("test", rows[::2])):
        (art / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    bb = root / "bigbench" / "tiny_mc"
    bb.mkdir(parents=True, exist_ok=True)
    examples = [{"input": f"{a} plus {b} is", "target_scores": {str(a + b): 1, str(a + b + 1): 0, str(a * b + 7): 0}}
                for a, b in [(1, 2), (2, 3), (3, 4), (4, 1), (5, 2), (6, 3), (7, 1), (2, 2)]]
    (bb / "task.json").write_text(json.dumps({"name": "tiny_mc", "examples": examples}))
    build_task_folder(["tiny_mc"], str(root / "bigbench"), None, art / "data" / "tasks")
    return root


def params(offload: str) -> dict:
    return {
        "model": {"name": SOURCE, "offload": offload},
        "data": {"bigbench": "bigbench", "next_sentence_per_topic": 2},
        "calibrate": {"n_samples": 6, "seq_len": 32},
        "capture": {"batch_size": 4, "dtype": "float32"},
        "cluster": {"pca_dim": 4},
        "taylor": {"batch_size": 4},
        "prune": {"method": "o_fang", "sparsity": 0.3, "batch_size": 4},
        "evaluate": {"dtype": "float32", "ppl_seq_len": 16, "ppl_max_windows_per_topic": 2, "batch_size": 2,
                     "task_limit": 4},
        "ica": {"n_components": 3, "n_restarts": 1, "batch_size": 4},
        "gprune": {"min_source_tokens": 16, "n_modules": 3, "batch_size": 4, "min_tau_z": 3.0},
        "attribute": {"batch_size": 4, "top_k": 3, "min_tokens": 8, "min_articles": 2, "n_boot": 100},
        "screen": {"min_examples": 4, "probe_examples": 4, "max_task_tokens": 2000, "max_total_tokens": 4000,
                   "max_request_tokens": 200, "batch_size": 1},
    }


def pipeline_steps(root: Path) -> list[tuple[str, object]]:
    """(stage, call) for every stage from fetch_model to the bench, each reading root's params.yaml; run them in root."""
    from stages import (allocate, attribute, bench, calibrate, capture, cluster, evaluate, fetch_model, gprune_modules,
                        group, ica, prune, screen_tasks, taylor)

    return [
        ("fetch_model", lambda: fetch_model.run("params.yaml")),
        ("calibrate", lambda: calibrate.run("params.yaml")),
        ("capture", lambda: capture.run("params.yaml")),
        ("cluster", lambda: cluster.run("params.yaml")),
        ("taylor", lambda: taylor.run("params.yaml")),
        ("group", lambda: group.run("params.yaml")),
        ("allocate", lambda: allocate.run("params.yaml")),
        ("prune", lambda: prune.run("params.yaml")),
        ("evaluate", lambda: evaluate.run("params.yaml", model_dir="artifacts/pruned", out="artifacts/metrics/pruned.json")),
        ("ica", lambda: ica.run("params.yaml")),
        ("gprune_modules", lambda: gprune_modules.run("params.yaml")),
        ("attribute", lambda: attribute.run("params.yaml")),
        ("screen_tasks", lambda: screen_tasks.run("params.yaml")),
        ("bench", lambda: bench.run("params.yaml", parts="pipeline,inference", max_seqs=2, prompt_len=8, new_tokens=2,
                                    repeats=1, batch_sizes="1")),
    ]


def run_pipeline(root: Path, offload: str, log=None) -> None:
    """Every stage from fetch_model to the bench in `root`, with model.offload=`offload`."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        Path("params.yaml").write_text(yaml.safe_dump(params(offload)))
        for name, step in pipeline_steps(root):
            step()
            if log is not None:
                log(name)
    finally:
        os.chdir(cwd)
