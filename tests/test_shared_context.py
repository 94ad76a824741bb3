"""Shared-context scoring gives lm-eval's numbers: against a plain full forward per request, and
against lm-eval's own HFLM on the same requests, on a dense and a physically pruned tiny model."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_model
from fang.evaluation.shared_context import group_by_context, score_continuations, shared_context_lm
from fang.model.shrink import decoder_layers, shrink_attention, shrink_mlp
from helpers_tokenizer import tiny_tokenizer


def _pruned(model):
    """Uneven layers: layer 0 loses a KV group and a third of its neurons, layer 1 half its neurons."""
    layers = decoder_layers(model)
    shrink_attention(layers[0].self_attn, torch.tensor([0, 2]), torch.arange(2), extra_o_bias=torch.randn(48))
    shrink_mlp(layers[0].mlp, torch.tensor([n for n in range(64) if n % 3]), extra_down_bias=torch.randn(48))
    shrink_mlp(layers[1].mlp, torch.arange(0, 64, 2))
    return model


@pytest.fixture(params=["dense", "pruned"])
def lm_model(request):
    model = tiny_model(6, 3, layers=2, seed=3)
    return _pruned(model) if request.param == "pruned" else model


def _requests(seed: int = 0, n_questions: int = 7) -> list:
    """Multiple-choice-shaped requests: questions of different lengths with 2-5 choices of 1-6 tokens."""
    rng = random.Random(seed)
    out = []
    for q in range(n_questions):
        ctx = [rng.randrange(4, 100) for _ in range(rng.randint(1, 30))]
        for _ in range(rng.randint(2, 5)):
            cont = [rng.randrange(4, 100) for _ in range(rng.randint(1, 6))]
            out.append(((f"q{q}", "c"), ctx, cont))
    rng.shuffle(out)  # lm-eval hands requests over in no particular order
    return out


@torch.no_grad()
def _reference(model, ctx, cont) -> tuple[float, bool]:
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(ids).logits[0, len(ctx) - 1: -1].float(), -1)
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_group_by_context_keeps_every_request_once():
    reqs = _requests()
    groups = group_by_context(reqs)
    assert sorted(i for rows in groups.values() for i in rows) == list(range(len(reqs)))
    assert all(len({tuple(reqs[i][1]) for i in rows}) == 1 for rows in groups.values())


def test_scores_equal_a_full_forward_per_request(lm_model):
    reqs = _requests()
    groups = group_by_context(reqs)
    contexts = [list(c) for c in groups]
    conts = [[reqs[i][2] for i in rows] for rows in groups.values()]
    scored = score_continuations(lm_model, contexts, conts)
    for ctx, rows, answers in zip(contexts, groups.values(), scored):
        for i, (total, greedy) in zip(rows, answers):
            ref_total, ref_greedy = _reference(lm_model, ctx, reqs[i][2])
            assert total == pytest.approx(ref_total, abs=1e-4)
            assert greedy == ref_greedy


def test_matches_lm_evals_hflm(lm_model):
    from lm_eval.models.huggingface import HFLM

    tok = tiny_tokenizer()
    reqs = _requests(seed=1, n_questions=12)
    ours = shared_context_lm(pretrained=lm_model, tokenizer=tok, batch_size=4)._loglikelihood_tokens(reqs, disable_tqdm=True)
    theirs = HFLM(pretrained=lm_model, tokenizer=tok, batch_size=4)._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert len(ours) == len(theirs) == len(reqs)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_too_long_requests_take_hflms_path():
    from lm_eval.models.huggingface import HFLM

    model = tiny_model(4, 4, layers=2, seed=1)
    tok = tiny_tokenizer()
    lm = shared_context_lm(pretrained=model, tokenizer=tok, batch_size=2, max_length=16)
    # 20 + 3 tokens > max_length + 1: HFLM truncates the context from the left; so must we
    long = ((("long", "c"), list(range(4, 24)), [30, 31, 32]))
    short = ((("short", "c"), [5, 6, 7], [8]))
    ours = lm._loglikelihood_tokens([long, short], disable_tqdm=True)
    theirs = HFLM(pretrained=model, tokenizer=tok, batch_size=2, max_length=16)._loglikelihood_tokens([long, short], disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert lm.batch_size == 2  # the one-at-a-time fallback gives the batch size back
    assert lm.batch_size == 2  # the one-at-a-time fallback gives the batch size back
