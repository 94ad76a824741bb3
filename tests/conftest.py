"""Tiny random LLaMA models shared by the tests (one with GQA, one without), and the tiny DVC project built once
per session for the end-to-end tests."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# pytest-xdist (`-n 2`): one thread per worker, for its own torch and for the fang/dvc subprocesses it starts.
# Two 2-thread torch processes on 2 cores slow each other several times over (docs/testing.md).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def tiny_config(n_heads: int = 4, n_kv_heads: int = 4, layers: int = 2, vocab: int = 128) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=48 // n_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def tiny_model(n_heads: int = 4, n_kv_heads: int = 4, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(n_heads, n_kv_heads, layers)).eval()
    # random init is near-zero; widen it so pruning decisions and compensation are visible
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(params=["mha", "gqa"])
def model(request) -> LlamaForCausalLM:
    """A 2-layer model: MHA (4 q / 4 kv heads) or GQA (6 q heads sharing 3 kv heads)."""
    return tiny_model(4, 4) if request.param == "mha" else tiny_model(6, 3)


@pytest.fixture
def input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (4, 16), generator=g)


@pytest.fixture
def calib() -> torch.Tensor:
    """Six calibration sequences of 24 tokens for pruning tests."""
    return torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(5))


def captured(model, calib: torch.Tensor, path, batch_size: int = 4):
    """A float32 capture store of `model` over `calib` under `path`, opened for reading."""
    from fang.analysis.capture import capture_features, open_capture

    capture_features(model, calib, path / "cap.zarr", batch_size=batch_size, dtype="float32")
    return open_capture(path / "cap.zarr")


def assert_reloads_identically(model, ids: torch.Tensor, path) -> None:
    """A pruned model's logits are finite and survive save_pruned -> load_pruned bit for bit."""
    from fang.model.shrink import load_pruned, save_pruned
    from helpers_tokenizer import tiny_tokenizer

    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    save_pruned(model, tiny_tokenizer(), path / "pruned")
    reloaded, _ = load_pruned(path / "pruned")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


@pytest.fixture(scope="session")
def main_job(tmp_path_factory):
    """The tiny project after one `dvc repro` of the main job, built once per session: (root, stages that ran).
    Tests that change it work on a copy (`helpers_project.copy_project`)."""
    from helpers_project import build_main_job

    return build_main_job(tmp_path_factory.mktemp("main_job") / "project")


def save_checkpoint(path, model: LlamaForCausalLM | None = None):
    """A dense checkpoint as fetch_model writes it (weights + the tiny tokenizer) at `path`: `model`, or a
    3-block GQA model (6 query / 3 KV heads)."""
    from helpers_tokenizer import tiny_tokenizer

    (model if model is not None else tiny_model(6, 3, layers=3)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def stage_project(root, model: LlamaForCausalLM | None = None) -> None:
    """The inputs a stage test runs calibrate..prune on under `root`: artifacts/model (`save_checkpoint`) and a
    30-article one-topic train split in artifacts/data."""
    import json

    save_checkpoint(root / "artifacts/model", model)
    rows = [{"id": f"People {i}", "title": f"People {i}", "topic": "People", "text": f"Person {i} was {'ab' * (i % 5)}."}
            for i in range(30)]
    (root / "artifacts/data").mkdir(parents=True)
    (root / "artifacts/data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
