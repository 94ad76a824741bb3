"""Structured Optimal Brain Compression (OBC) of a Linear layer's input channels, as tensor functions.

Layer-wise problem (paper Eq. 4): choose input columns of W [out, C] to remove and update the kept
columns so that ||W X - W' X||^2 over calibration tokens X [C, T] stays small. With the Hessian
H = X X^T (+ dampening) and its inverse H^-1:

- removing a block of columns M optimally costs  tr(W_M ([H^-1]_MM)^-1 W_M^T)           (`obc_scores`);
  for a single column j that is  e_j = sum_i W_ij^2 / [H^-1]_jj                           (Eq. 9);
- the optimal update of the kept columns is  dW = -(H^-1 I_M ([H^-1]_MM)^-1 W_M^T)^T     (Eq. 10,
  `obc_compensate`), which zeroes the removed columns and equals the least-squares refit of the
  kept columns: W_K' = W H_:K (H_KK)^-1 (block-inverse identity; tests check it against lstsq).

`obc_prune` is the paper's one-shot variant (Algorithm 2: score once, remove the lowest blocks,
one unified compensation); `obc_prune_iterative` is traditional greedy OBC (Algorithm 1: remove
one block, compensate, update H^-1 by the Schur complement, rescore).

Everything runs in float64: H^-1 of activations with outlier channels is badly conditioned, and
the compensation subtracts nearly equal quantities.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import flap
from .errors import FangError, require

# Tokens per chunk when accumulating a Hessian: bounds the float64 copy of the activations.
_HESSIAN_CHUNK = 4096


def accumulate_hessian(hessian: Tensor, x: Tensor, weights: Tensor | None = None) -> float:
    """hessian += sum_t w_t x_t x_t^T over the tokens (rows) of x [..., C], in place; returns sum_t w_t.

    Tokens with zero weight are skipped (they add nothing), so e.g. a group that only looks at
    one token cluster pays only for that cluster's tokens.
    """
    n = hessian.shape[0]
    require(x.shape[-1] == n, f"accumulate_hessian: x has {x.shape[-1]} channels, Hessian is {n} x {n}")
    x = x.detach().reshape(-1, n)
    if weights is not None:
        w = weights.detach().reshape(-1).to(device=x.device, dtype=torch.float64)
        require(w.numel() == x.shape[0], f"accumulate_hessian: {w.numel()} weights for {x.shape[0]} tokens")
        require(
            bool(torch.isfinite(w).all()) and not bool((w < 0).any()),
            "accumulate_hessian: weights must be finite and >= 0",
        )
        nonzero = w > 0
        if not bool(nonzero.all()):
            x, w = x[nonzero], w[nonzero]
        total = float(w.sum())
    else:
        w = None
        total = float(x.shape[0])
    for start in range(0, x.shape[0], _HESSIAN_CHUNK):
        xc = x[start : start + _HESSIAN_CHUNK].to(device=hessian.device, dtype=torch.float64)
        if w is not None:
            # sqrt(w) on both factors keeps the product a Gram matrix (symmetric PSD by construction)
            xc = xc * w[start : start + _HESSIAN_CHUNK].to(hessian.device).sqrt()[:, None]
        hessian.addmm_(xc.T, xc)
    return total


class HessianAccumulator:
    """Streaming H = sum_t w_t x_t x_t^T of one Linear input over calibration batches (float64)."""

    def __init__(self, n_channels: int, device: torch.device | str = "cpu") -> None:
        require(n_channels > 0, f"HessianAccumulator: n_channels={n_channels} must be positive")
        self.hessian = torch.zeros(n_channels, n_channels, dtype=torch.float64, device=device)
        self.n_tokens = 0
        self.weight_sum = 0.0

    def add_batch(self, x: Tensor, weights: Tensor | None = None) -> None:
        self.n_tokens += x.numel() // max(x.shape[-1], 1)
        self.weight_sum += accumulate_hessian(self.hessian, x, weights)


def inverse_hessian(hessian: Tensor, damp: float, where: str = "layer") -> Tensor:
    """(H + damp * mean(diag H) * I)^-1 in float64, or a FangError naming `where` if that is impossible.

    Dampening relative to the mean diagonal makes the result independent of the Hessian's scale
    (so token weights that rescale H change nothing) and regularises channels that were never
    active on the calibration data (zero rows/columns of H).
    """
    require(damp >= 0, f"{where}: damp={damp} must be >= 0")
    h = hessian.detach().to(torch.float64)
    if not bool(torch.isfinite(h).all()):
        raise FangError(
            f"{where}: the Hessian contains NaN or Inf: the calibration activations reaching this layer are not "
            "finite (check the model dtype and the earlier layers)"
        )
    mean_diag = float(h.diagonal().mean())
    if not mean_diag > 0:
        raise FangError(f"{where}: the Hessian is zero: no calibration signal reached this layer's input")
    h = h + torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * (damp * mean_diag)
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise FangError(
            f"{where}: the Hessian is singular (not positive definite) with damp={damp}: some input channels are "
            "never active or linearly dependent on the calibration data; increase prune.damp (e.g. 0.01)"
        )
    hinv = torch.cholesky_inverse(chol)
    if not bool(torch.isfinite(hinv).all()):
        raise FangError(f"{where}: inverting the Hessian produced NaN/Inf; increase prune.damp")
    return hinv


def _as_blocks(blocks: Tensor | None, n_columns: int) -> Tensor:
    """[n_blocks, width] column indices; None = every column its own block."""
    if blocks is None:
        return torch.arange(n_columns).reshape(-1, 1)
    blocks = torch.as_tensor(blocks, dtype=torch.long).cpu()
    require(blocks.dim() == 2 and blocks.numel() > 0, f"blocks must be [n_blocks, width], got {tuple(blocks.shape)}")
    require(bool(((blocks >= 0) & (blocks < n_columns)).all()), f"block column indices out of range [0, {n_columns})")
    require(torch.unique(blocks).numel() == blocks.numel(), "blocks overlap: a column belongs to two blocks")
    return blocks


def _check(weight: Tensor, hinv: Tensor) -> None:
    require(weight.dim() == 2, f"weight must be [out, in], got {tuple(weight.shape)}")
    n = weight.shape[1]
    require(hinv.shape == (n, n), f"inverse Hessian is {tuple(hinv.shape)}, weight has {n} input columns")


def _chol(a: Tensor, where: str) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info != 0).any()):
        raise FangError(f"{where}: a block of the inverse Hessian is not positive definite; increase prune.damp")
    return chol


def obc_scores(weight: Tensor, hinv: Tensor, blocks: Tensor | None = None, where: str = "layer") -> Tensor:
    """Output error of removing each block of columns with optimal compensation -> [n_blocks] float64.

    Single columns (blocks=None): e_j = sum_i W_ij^2 / [H^-1]_jj (Eq. 9). A block M of columns (a
    head, or a GQA unit of heads): tr(W_M ([H^-1]_MM)^-1 W_M^T), which reduces to Eq. 9 for |M| = 1.
    """
    _check(weight, hinv)
    w = weight.detach().to(device=hinv.device, dtype=torch.float64)
    if blocks is None:
        return w.square().sum(0) / hinv.diagonal()
    b = _as_blocks(blocks, w.shape[1]).to(hinv.device)
    h_bb = hinv[b[:, :, None], b[:, None, :]]  # [n_blocks, width, width]
    w_b = w[:, b].permute(1, 2, 0)  # [n_blocks, width, out]
    # tr(W_M A^-1 W_M^T) = ||L^-1 W_M^T||_F^2 with A = L L^T
    z = torch.linalg.solve_triangular(_chol(h_bb, where), w_b, upper=False)
    return z.square().sum((1, 2))


def obc_compensate(weight: Tensor, hinv: Tensor, pruned: Tensor, where: str = "layer") -> Tensor:
    """W + dW with dW = -(H^-1 I_M ([H^-1]_MM)^-1 W_M^T)^T (Eq. 10) for the pruned columns M -> float64.

    The pruned columns come out exactly zero; the kept ones hold the least-squares optimum
    W_K' = W H_:K (H_KK)^-1 for the (dampened) Hessian.
    """
    _check(weight, hinv)
    w = weight.detach().to(device=hinv.device, dtype=torch.float64)
    m = torch.as_tensor(pruned, dtype=torch.long).reshape(-1).to(hinv.device)
    if m.numel() == 0:
        return w.clone()
    h_mm = hinv[m[:, None], m[None, :]]
    # ([H^-1]_MM)^-1 W_M^T by Cholesky solve, then back through the rows M of H^-1
    coef = torch.cholesky_solve(w[:, m].T, _chol(h_mm, where))  # [|M|, out]
    out = w - coef.T @ hinv[m, :]
    out[:, m] = 0.0  # exact zeros (they are zero up to round-off) so nothing of M leaks into shrinking
    return out


def _removable_mask(removable: Tensor | None, n_blocks: int) -> Tensor:
    if removable is None:
        return torch.ones(n_blocks, dtype=torch.bool)
    removable = torch.as_tensor(removable, dtype=torch.bool).reshape(-1).cpu()
    require(removable.numel() == n_blocks, f"removable mask has {removable.numel()} entries for {n_blocks} blocks")
    return removable


def _check_count(n_remove: int, removable: Tensor) -> None:
    n_ok = int(removable.sum())
    require(0 <= n_remove <= n_ok, f"cannot remove {n_remove} blocks: only {n_ok} are removable")


def obc_prune(
    weight: Tensor,
    hinv: Tensor,
    n_remove: int,
    blocks: Tensor | None = None,
    removable: Tensor | None = None,
    where: str = "layer",
) -> tuple[Tensor, Tensor]:
    """One-shot structured OBC (the paper's variant, Algorithm 2) -> (kept block ids ascending, new weight).

    Scores every block once (`obc_scores`), removes the `n_remove` lowest among the `removable`
    ones (ties: the higher index goes, as in `flap.select_top`), and applies the unified
    compensation of Eq. 10 to the kept columns. The returned weight is float64, full width, with
    the removed columns zeroed.
    """
    _check(weight, hinv)
    b = _as_blocks(blocks, weight.shape[1])
    ok = _removable_mask(removable, b.shape[0])
    _check_count(n_remove, ok)
    scores = obc_scores(weight, hinv, None if blocks is None else b, where).cpu()
    if not bool(torch.isfinite(scores[ok]).all()):
        raise FangError(f"{where}: OBC scores are not finite; increase prune.damp")
    scores = torch.where(ok, scores, torch.full_like(scores, float("inf")))
    keep = flap.select_top(scores, b.shape[0] - n_remove)
    gone = torch.ones(b.shape[0], dtype=torch.bool)
    gone[keep] = False
    new_w = obc_compensate(weight, hinv, b[gone].reshape(-1), where)
    _require_finite(new_w, where)
    return keep, new_w


def obc_prune_iterative(
    weight: Tensor,
    hinv: Tensor,
    n_remove: int,
    blocks: Tensor | None = None,
    removable: Tensor | None = None,
    where: str = "layer",
) -> tuple[Tensor, Tensor]:
    """Traditional greedy OBC (Algorithm 1) -> (kept block ids ascending, new float64 weight).

    Repeats `n_remove` times: score the remaining removable blocks, remove the cheapest (ties: the
    higher index), compensate with Eq. 10 for that block alone, and eliminate its columns from
    H^-1 by the Schur complement  H^-1 <- H^-1 - H^-1_:M ([H^-1]_MM)^-1 H^-1_M:, which is the
    inverse Hessian of the remaining columns (removed ones become zero rows/columns).
    """
    _check(weight, hinv)
    b = _as_blocks(blocks, weight.shape[1])
    ok = _removable_mask(removable, b.shape[0]).clone()
    _check_count(n_remove, ok)
    w = weight.detach().to(device=hinv.device, dtype=torch.float64).clone()
    h = hinv.detach().to(torch.float64).clone()
    alive = torch.ones(b.shape[0], dtype=torch.bool)
    single = blocks is None
    for _ in range(n_remove):
        cand = alive & ok
        if single:  # removed columns give 0/0 here; they are masked just below
            scores = obc_scores(w, h, None, where).cpu()
        else:
            scores = _alive_block_scores(w, h, b, cand, where)
        scores = torch.where(cand, scores, torch.full_like(scores, float("inf")))
        if not bool(torch.isfinite(scores[cand]).all()):
            raise FangError(f"{where}: OBC scores are not finite during greedy pruning; increase prune.damp")
        # argmin of the flipped vector = the last minimum: ties remove the higher index, as one-shot does
        j = b.shape[0] - 1 - int(torch.argmin(scores.flip(0)))
        m = b[j].to(h.device)
        h_mm = h[m[:, None], m[None, :]]
        chol = _chol(h_mm, where)
        coef = torch.cholesky_solve(w[:, m].T, chol)  # [|M|, out]
        w -= coef.T @ h[m, :]
        w[:, m] = 0.0
        h -= h[:, m] @ torch.cholesky_solve(h[m, :], chol)
        h[m, :] = 0.0
        h[:, m] = 0.0
        alive[j] = False
    _require_finite(w, where)
    return torch.nonzero(alive).reshape(-1), w


def _alive_block_scores(w: Tensor, h: Tensor, blocks: Tensor, cand: Tensor, where: str) -> Tensor:
    """Block scores for the candidate blocks only (removed blocks have zero H^-1 blocks); others +inf."""
    scores = torch.full((blocks.shape[0],), float("inf"), dtype=torch.float64)
    idx = torch.nonzero(cand).reshape(-1)
    if idx.numel():
        scores[idx] = obc_scores(w, h, blocks[idx], where).cpu()
    return scores


def _require_finite(w: Tensor, where: str) -> None:
    if not bool(torch.isfinite(w).all()):
        raise FangError(f"{where}: OBC compensation produced NaN/Inf weights; increase prune.damp")
