"""Structured OBC on small random matrices: scores, compensation = least squares, one-shot vs greedy, errors."""

from __future__ import annotations

import pytest
import torch

from fang.core.errors import FangError
from fang.methods.obc import (
    HessianAccumulator,
    accumulate_hessian,
    inverse_hessian,
    obc_compensate,
    obc_prune,
    obc_prune_iterative,
    obc_scores,
)


def _problem(n_in=12, n_out=5, n_tok=80, seed=0):
    """W [out, in] and X [in, T] with correlated, unevenly scaled channels (so OBC has work to do)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g, dtype=torch.float64) * 0.5 + torch.eye(n_in, dtype=torch.float64)
    x = mix @ torch.randn(n_in, n_tok, generator=g, dtype=torch.float64)
    x = x * torch.linspace(0.3, 2.0, n_in, dtype=torch.float64)[:, None] + 0.5
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    return w, x


def _err(w_new, w, x):
    return float(((w - w_new) @ x).square().sum())


def _lstsq_refit(w, x, keep_cols, extra_rows=None):
    """Least-squares optimum of the kept columns: min_B ||W X - B X_K||^2 (optionally with extra data rows)."""
    a = x[keep_cols].T  # [T, |K|]
    b = (w @ x).T  # [T, out]
    if extra_rows is not None:
        a = torch.cat([a, extra_rows[0]])
        b = torch.cat([b, extra_rows[1]])
    return torch.linalg.lstsq(a, b).solution.T  # [out, |K|]


def _kept_cols(keep_blocks, blocks):
    return blocks[keep_blocks].reshape(-1).sort().values


def test_scores_match_eq9_and_the_true_removal_cost():
    w, x = _problem()
    hinv = inverse_hessian(x @ x.T, damp=0.0)
    e = obc_scores(w, hinv)
    n_out, n_in = w.shape
    direct = torch.tensor([sum(float(w[i, j]) ** 2 / float(hinv[j, j]) for i in range(n_out)) for j in range(n_in)])
    torch.testing.assert_close(e, direct.double())
    # width-1 blocks are the same formula
    torch.testing.assert_close(obc_scores(w, hinv, torch.arange(12).reshape(-1, 1)), e)
    # a block's score is the squared output error left after removing it with the best refit
    blocks = torch.arange(12).reshape(4, 3)
    scores = obc_scores(w, hinv, blocks)
    for b in range(4):
        keep = torch.tensor([c for c in range(12) if c not in blocks[b].tolist()])
        refit = torch.zeros_like(w)
        refit[:, keep] = _lstsq_refit(w, x, keep)
        assert float(scores[b]) == pytest.approx(_err(refit, w, x), rel=1e-8)


@pytest.mark.parametrize("damp", [0.0, 0.05])
@pytest.mark.parametrize("blocks", [None, torch.arange(12).reshape(4, 3)])
def test_one_shot_compensation_is_the_least_squares_optimum(damp, blocks):
    w, x = _problem()
    h = x @ x.T
    hinv = inverse_hessian(h, damp=damp)
    n_remove = 5 if blocks is None else 2
    keep, new_w = obc_prune(w, hinv, n_remove, blocks)
    b = torch.arange(12).reshape(-1, 1) if blocks is None else blocks
    assert keep.numel() == b.shape[0] - n_remove
    cols = _kept_cols(keep, b)
    pruned = torch.tensor([c for c in range(12) if c not in cols.tolist()])
    assert torch.equal(new_w[:, pruned], torch.zeros(w.shape[0], pruned.numel(), dtype=torch.float64))
    # dampening = ridge: lstsq on X augmented with sqrt(lambda) I rows (target rows W^T for the ridge part)
    extra = None
    if damp > 0:
        lam = damp * float(h.diagonal().mean())
        eye = torch.eye(12, dtype=torch.float64) * lam**0.5
        extra = (eye[:, cols], (w @ eye).T)
    torch.testing.assert_close(new_w[:, cols], _lstsq_refit(w, x, cols, extra), rtol=1e-7, atol=1e-9)
    plain = w.clone()
    plain[:, pruned] = 0
    assert _err(new_w, w, x) <= _err(plain, w, x) * (1 + 1e-12)
    assert _err(new_w, w, x) < 0.9 * _err(plain, w, x)  # and it really helps on correlated inputs


def test_one_shot_removes_the_lowest_scores_and_respects_removable():
    w, x = _problem(seed=3)
    hinv = inverse_hessian(x @ x.T, damp=0.01)
    e = obc_scores(w, hinv)
    keep, _ = obc_prune(w, hinv, 4)
    assert set(range(12)) - set(keep.tolist()) == set(torch.argsort(e)[:4].tolist())
    removable = torch.ones(12, dtype=torch.bool)
    lowest = int(torch.argmin(e))
    removable[lowest] = False
    keep2, new_w = obc_prune(w, hinv, 4, removable=removable)
    assert lowest in keep2.tolist() and keep2.numel() == 8
    with pytest.raises(FangError, match="removable"):
        obc_prune(w, hinv, 12, removable=removable)


SLOTS = torch.arange(12).reshape(3, 4).T.contiguous()  # strided blocks, like GQA query slots


@pytest.mark.parametrize("blocks", [None, torch.arange(12).reshape(4, 3), SLOTS])
def test_iterative_equals_one_shot_for_a_single_removal(blocks):
    w, x = _problem(seed=1)
    hinv = inverse_hessian(x @ x.T, damp=0.01)
    keep_a, w_a = obc_prune(w, hinv, 1, blocks)
    keep_b, w_b = obc_prune_iterative(w, hinv, 1, blocks)
    assert torch.equal(keep_a, keep_b)
    torch.testing.assert_close(w_a, w_b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("blocks", [None, torch.arange(12).reshape(6, 2)])
def test_iterative_final_weights_are_the_refit_of_what_it_kept(blocks):
    """Successive OBS updates are exact, so greedy OBC ends at the least-squares refit of its kept set."""
    w, x = _problem(seed=2)
    hinv = inverse_hessian(x @ x.T, damp=0.0)
    keep, new_w = obc_prune_iterative(w, hinv, 4 if blocks is None else 2, blocks)
    b = torch.arange(12).reshape(-1, 1) if blocks is None else blocks
    cols = _kept_cols(keep, b)
    torch.testing.assert_close(new_w[:, cols], _lstsq_refit(w, x, cols), rtol=1e-6, atol=1e-8)
    # greedy is not guaranteed to beat one-shot, but its refit always beats plain removal of the same columns
    pruned = torch.tensor([c for c in range(12) if c not in cols.tolist()])
    plain = w.clone()
    plain[:, pruned] = 0
    assert _err(new_w, w, x) <= _err(plain, w, x)


def test_compensate_nothing_is_identity():
    w, x = _problem()
    hinv = inverse_hessian(x @ x.T, 0.01)
    torch.testing.assert_close(obc_compensate(w, hinv, torch.tensor([], dtype=torch.long)), w)


def test_hessian_accumulation_weighted_and_chunked():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=g)
    w = torch.rand(3, 7, generator=g)
    w[0] = 0.0  # zero-weight tokens are skipped
    acc = HessianAccumulator(5)
    acc.add_batch(x[:2], w[:2])
    acc.add_batch(x[2:], w[2:])
    flat, fw = x.reshape(-1, 5).double(), w.reshape(-1).double()
    # a running mean in float32: times the weight sum it is the weighted sum
    assert acc.hessian.dtype == torch.float32
    torch.testing.assert_close(acc.hessian.double() * acc.weight_sum, (flat * fw[:, None]).T @ flat, rtol=1e-5, atol=1e-5)
    assert acc.n_tokens == 21 and acc.weight_sum == pytest.approx(float(fw.sum()))
    plain = torch.zeros(5, 5, dtype=torch.float64)
    assert accumulate_hessian(plain, x) == 21
    torch.testing.assert_close(plain, flat.T @ flat)


def test_singular_and_nan_hessians_are_clear_errors():
    w, x = _problem()
    x[4] = 0.0  # a channel that is never active: zero row/column in H
    h = x @ x.T
    with pytest.raises(FangError, match="layer 7 down_proj.*singular"):
        inverse_hessian(h, damp=0.0, where="layer 7 down_proj")
    hinv = inverse_hessian(h, damp=0.01)  # dampening makes it invertible
    keep, new_w = obc_prune(w, hinv, 3)
    assert torch.isfinite(new_w).all() and 4 not in keep.tolist()  # the dead channel costs nothing to remove
    h_nan = h.clone()
    h_nan[1, 2] = float("nan")
    with pytest.raises(FangError, match="layer 3 o_proj.*NaN"):
        inverse_hessian(h_nan, damp=0.01, where="layer 3 o_proj")
    with pytest.raises(FangError, match="zero"):
        inverse_hessian(torch.zeros(4, 4), damp=0.01)
