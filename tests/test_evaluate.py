"""Perplexity against a direct computation, a real lm-eval zero-shot run, and corpus loading."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_model
from fang.core.errors import FangError
from fang.data.tasks import build_task_folder
from fang.evaluation import evaluate as E
from helpers_tokenizer import tiny_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Pack my box with five dozen liquor jugs.",
    "How vexingly quick daft zebras jump! " * 4,
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_make_windows_concatenates_with_eos(tok):
    w = E.make_windows(tok, TEXTS, seq_len=32, max_windows=None)
    flat = []
    for i, t in enumerate(TEXTS):
        flat += ([tok.eos_token_id] if i else []) + tok(t, add_special_tokens=False)["input_ids"]
    n = len(flat) // 32
    assert w.dtype == torch.long and w.shape == (n, 32)
    assert w.flatten().tolist() == flat[: n * 32]
    capped = E.make_windows(tok, TEXTS, seq_len=32, max_windows=2)
    assert torch.equal(capped, w[:2])
    assert torch.equal(E.make_windows(tok, TEXTS, 32, 2), capped)  # deterministic
    assert E.make_windows(tok, ["tiny"], seq_len=32, max_windows=3).shape == (0, 32)


def test_perplexity_matches_direct_computation(tok):
    model = tiny_model()
    windows = E.make_windows(tok, TEXTS, seq_len=24, max_windows=5)
    ppl = E.perplexity(model, windows, batch_size=2, device="cpu")
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss  # mean NLL over all shifted tokens
    assert ppl == pytest.approx(math.exp(loss.item()), rel=1e-4)
    assert E.perplexity(model, windows, batch_size=5, device="cpu") == pytest.approx(ppl, rel=1e-5)


def test_perplexity_by_topic_is_token_weighted(tok):
    model = tiny_model()
    rows = [
        {"id": "a", "topic": "Alpha", "text": TEXTS[0]},
        {"id": "b", "topic": "Alpha", "text": TEXTS[1]},
        {"id": "c", "topic": "Beta", "text": TEXTS[2]},
        {"id": "d", "topic": "Gamma", "text": "too short"},
    ]
    out = E.perplexity_by_topic(model, tok, rows, seq_len=20, max_windows_per_topic=3, batch_size=2, device="cpu")
    assert sorted(out["by_topic"]) == ["Alpha", "Beta"] and out["skipped"] == ["Gamma"]
    alpha = E.make_windows(tok, TEXTS[:2], 20, 3)
    beta = E.make_windows(tok, TEXTS[2:], 20, 3)
    assert out["tokens"] == {"Alpha": alpha.shape[0] * 19, "Beta": beta.shape[0] * 19}
    assert out["by_topic"]["Alpha"] == pytest.approx(E.perplexity(model, alpha, 4, "cpu"), rel=1e-5)
    both = E.perplexity(model, torch.cat([alpha, beta]), 4, "cpu")
    assert out["overall"] == pytest.approx(both, rel=1e-5)
    # per-window NLL, kept for paired comparisons, adds up to the topic's perplexity
    assert out["window_tokens"] == 19 and len(out["window_nll"]["Alpha"]) == alpha.shape[0]
    assert math.exp(sum(out["window_nll"]["Alpha"]) / out["tokens"]["Alpha"]) == pytest.approx(out["by_topic"]["Alpha"])
    with pytest.raises(FangError, match="perplexity window"):
        E.perplexity_by_topic(model, tok, rows[3:], 20, 3, 2, "cpu")


def _tiny_bigbench(root):
    task = {
        "name": "tiny_mc",
        "examples": [
            {"input": f"{a} plus {b} is", "target_scores": {str(a + b): 1, str(a + b + 1): 0, str(a * b + 7): 0}}
            for a, b in [(1, 2), (2, 3), (3, 4), (4, 1), (5, 2), (6, 3)]
        ],
    }
    (root / "tiny_mc").mkdir(parents=True)
    (root / "tiny_mc" / "task.json").write_text(json.dumps(task))


def _short_articles():
    rows = []
    for topic in ("Cats", "Dogs"):
        for i in range(5):
            rows.append({"id": f"{topic}{i}", "title": "t", "topic": topic, "text": f"A {topic} fact {i}. Next bit {i} here. End."})
    return rows


def test_zero_shot_on_tiny_model(tok, tmp_path):
    _tiny_bigbench(tmp_path / "bb")
    manifest = build_task_folder(["tiny_mc", "next_sentence"], str(tmp_path / "bb"), _short_articles(), tmp_path / "tasks", 3, 0)
    names = [n for e in manifest["tasks"] for n in e["lm_eval_tasks"]]
    assert names == ["bb_tiny_mc", "next_sentence"]
    res = E.zero_shot(tiny_model(), tok, tmp_path / "tasks", names, limit=4, batch_size=4)
    assert set(res) == {"bb_tiny_mc", "next_sentence", "next_sentence_cats", "next_sentence_dogs"}
    assert res["bb_tiny_mc"]["n"] == 4 and res["next_sentence_cats"]["n"] == 3
    assert res["next_sentence"]["n"] == 6
    for name, r in res.items():
        for key in ("acc", "acc_norm"):
            assert 0.0 <= r[key] <= 1.0, (name, key)
            assert isinstance(r[f"{key}_stderr"], float) and r[f"{key}_stderr"] >= 0.0, (name, key)
    # the group is the size-weighted pool of its topics
    pooled = (res["next_sentence_cats"]["acc"] * 3 + res["next_sentence_dogs"]["acc"] * 3) / 6
    assert res["next_sentence"]["acc"] == pytest.approx(pooled)
    # per-question scores (paired comparisons) reproduce lm-eval's accuracies, first docs in order
    for name in ("bb_tiny_mc", "next_sentence_cats"):
        pe = res[name]["per_example"]
        assert pe["doc_id"] == list(range(res[name]["n"]))
        assert sum(pe["acc"]) / len(pe["acc"]) == pytest.approx(res[name]["acc"])
        assert set(pe["acc_norm"]) <= {0.0, 1.0}


def test_zero_shot_unknown_local_task(tok, tmp_path):
    _tiny_bigbench(tmp_path / "bb")
    build_task_folder(["tiny_mc"], str(tmp_path / "bb"), None, tmp_path / "tasks")
    with pytest.raises(FangError, match="bb_nope"):
        E.zero_shot(tiny_model(), tok, tmp_path / "tasks", ["bb_nope"], limit=2, batch_size=2)
