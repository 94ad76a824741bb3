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

Precision. Hessians are accumulated in float32 as SparseGPT does: a running weighted *mean*
H = sum_t w_t x_t x_t^T / sum_t w_t, rescaled before each batch is added, so the entries stay at
the scale of one token's x x^T however many tokens pass (a float32 sum over 262k tokens of
activations with outliers would grow by 5 orders of magnitude and lose digits to every addition),
and the Cholesky factor, H^-1, scores and compensation then run in the Hessian's dtype. Dampening
relative to the mean diagonal (`inverse_hessian`) bounds the condition number by about
1 + max eig / (damp * mean diag), which float32 factors stably for the default damp = 0.01; a
Hessian that still fails is an error naming the layer. float32 halves the Hessian's memory
(a 28672-wide FFN of a 70B model: 3.3 GB instead of 6.6 GB) and runs at full speed on GPUs, whose
float64 throughput is 1/2 to 1/64 of float32. `HESSIAN_DTYPE = torch.float64` restores the
previous all-float64 path; tests check that both choose the same units on a tiny model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.errors import FangError, require
from .base import LayerContext, PruningMethod, Selection, checked_units, select_top

# Tokens per chunk when accumulating a Hessian: bounds the float copy of the activations.
_HESSIAN_CHUNK = 4096
# dtype of newly accumulated Hessians (and so of H^-1 and the OBC arithmetic after it); read at call time
HESSIAN_DTYPE = torch.float32


def accumulate_hessian(hessian: Tensor, x: Tensor, weights: Tensor | None = None) -> float:
    """hessian += sum_t w_t x_t x_t^T over the tokens (rows) of x [..., C], in place; returns sum_t w_t.

    A raw sum in the Hessian's dtype (`HessianAccumulator` keeps the running mean instead).
    Tokens with zero weight are skipped (they add nothing), so e.g. a group that only looks at
    one token cluster pays only for that cluster's tokens.
    """
    x, w, total = _tokens(x, weights, hessian.shape[0])
    _add_gram(hessian, x, w, 1.0)
    return total


def _tokens(x: Tensor, weights: Tensor | None, n: int) -> tuple[Tensor, Tensor | None, float]:
    """(tokens [T, n] with nonzero weight, their float64 weights or None, sum of the weights), validated."""
    require(x.shape[-1] == n, f"accumulate_hessian: x has {x.shape[-1]} channels, Hessian is {n} x {n}")
    x = x.detach().reshape(-1, n)
    if weights is None:
        return x, None, float(x.shape[0])
    w = weights.detach().reshape(-1).to(device=x.device, dtype=torch.float64)
    require(w.numel() == x.shape[0], f"accumulate_hessian: {w.numel()} weights for {x.shape[0]} tokens")
    require(
        bool(torch.isfinite(w).all()) and not bool((w < 0).any()),
        "accumulate_hessian: weights must be finite and >= 0",
    )
    nonzero = w > 0
    if not bool(nonzero.all()):
        x, w = x[nonzero], w[nonzero]
    return x, w, float(w.sum())


def _add_gram(hessian: Tensor, x: Tensor, w: Tensor | None, scale: float) -> None:
    """hessian += scale * sum_t w_t x_t x_t^T, chunked so only one chunk of x is converted at a time."""
    for start in range(0, x.shape[0], _HESSIAN_CHUNK):
        xc = x[start : start + _HESSIAN_CHUNK].to(device=hessian.device, dtype=hessian.dtype)
        # sqrt(scale * w) on both factors keeps the product a Gram matrix (symmetric PSD by construction)
        if w is not None:
            f = (w[start : start + _HESSIAN_CHUNK] * scale).sqrt().to(device=hessian.device, dtype=hessian.dtype)
            xc = xc * f[:, None]
        elif scale != 1.0:
            xc = xc * scale**0.5
        hessian.addmm_(xc.T, xc)


class HessianAccumulator:
    """Streaming weighted mean H = sum_t w_t x_t x_t^T / sum_t w_t of one Linear input (SparseGPT-style).

    The mean rather than the sum: OBC's choices and compensation do not depend on H's scale
    (dampening is relative to its mean diagonal), and the mean keeps float32 entries bounded.
    `weight_sum` (sum_t w_t) recovers the sum when it is needed. The dtype is `HESSIAN_DTYPE`
    (float32), or float64 when the activations themselves are float64.
    """

    def __init__(self, n_channels: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> None:
        require(n_channels > 0, f"HessianAccumulator: n_channels={n_channels} must be positive")
        self.hessian = torch.zeros(n_channels, n_channels, dtype=dtype or HESSIAN_DTYPE, device=device)
        self.n_tokens = 0
        self.weight_sum = 0.0

    def add_batch(self, x: Tensor, weights: Tensor | None = None) -> None:
        if x.dtype == torch.float64 and self.hessian.dtype != torch.float64 and self.weight_sum == 0:
            self.hessian = self.hessian.double()  # float64 activations keep their precision
        self.n_tokens += x.numel() // max(x.shape[-1], 1)
        x, w, total = _tokens(x, weights, self.hessian.shape[0])
        if not total > 0:
            return
        new_sum = self.weight_sum + total
        # H <- H * old/new + (this batch's sum) / new: the running mean (SparseGPT's H *= n / (n + tmp))
        self.hessian.mul_(self.weight_sum / new_sum)
        _add_gram(self.hessian, x, w, 1.0 / new_sum)
        self.weight_sum = new_sum


def inverse_hessian(hessian: Tensor, damp: float, where: str = "layer") -> Tensor:
    """(H + damp * mean(diag H) * I)^-1 in H's dtype (at least float32), or a FangError naming `where`.

    Dampening relative to the mean diagonal makes the result independent of the Hessian's scale
    (so token weights that rescale H change nothing) and regularises channels that were never
    active on the calibration data (zero rows/columns of H).
    """
    require(damp >= 0, f"{where}: damp={damp} must be >= 0")
    dtype = hessian.dtype if hessian.dtype in (torch.float32, torch.float64) else torch.float32
    h = hessian.detach().to(dtype)
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
            f"{where}: the Hessian is singular (not positive definite) in {str(dtype)[6:]} with damp={damp}: some "
            "input channels are never active or linearly dependent on the calibration data; increase prune.damp "
            "(e.g. 0.01)"
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
    """Output error of removing each block of columns with optimal compensation -> [n_blocks] in H^-1's dtype.

    Single columns (blocks=None): e_j = sum_i W_ij^2 / [H^-1]_jj (Eq. 9). A block M of columns (a
    head, or a GQA unit of heads): tr(W_M ([H^-1]_MM)^-1 W_M^T), which reduces to Eq. 9 for |M| = 1.
    """
    _check(weight, hinv)
    w = weight.detach().to(device=hinv.device, dtype=hinv.dtype)
    if blocks is None:
        return w.square().sum(0) / hinv.diagonal()
    b = _as_blocks(blocks, w.shape[1]).to(hinv.device)
    h_bb = hinv[b[:, :, None], b[:, None, :]]  # [n_blocks, width, width]
    w_b = w[:, b].permute(1, 2, 0)  # [n_blocks, width, out]
    # tr(W_M A^-1 W_M^T) = ||L^-1 W_M^T||_F^2 with A = L L^T
    z = torch.linalg.solve_triangular(_chol(h_bb, where), w_b, upper=False)
    return z.square().sum((1, 2))


def obc_compensate(weight: Tensor, hinv: Tensor, pruned: Tensor, where: str = "layer") -> Tensor:
    """W + dW with dW = -(H^-1 I_M ([H^-1]_MM)^-1 W_M^T)^T (Eq. 10) for the pruned columns M, in H^-1's dtype.

    The pruned columns come out exactly zero; the kept ones hold the least-squares optimum
    W_K' = W H_:K (H_KK)^-1 for the (dampened) Hessian.
    """
    _check(weight, hinv)
    w = weight.detach().to(device=hinv.device, dtype=hinv.dtype)
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


def _removal(weight: Tensor, hinv: Tensor, n_remove: int, blocks: Tensor | None,
             removable: Tensor | None) -> tuple[Tensor, Tensor]:
    """(blocks [n_blocks, width], removable mask [n_blocks]) of an `obc_prune*` call, after checking its
    arguments: the weight against H^-1, and that `n_remove` blocks can be removed."""
    _check(weight, hinv)
    b = _as_blocks(blocks, weight.shape[1])
    ok = _removable_mask(removable, b.shape[0])
    n_ok = int(ok.sum())
    require(0 <= n_remove <= n_ok, f"cannot remove {n_remove} blocks: only {n_ok} are removable")
    return b, ok


def obc_prune(weight: Tensor, hinv: Tensor, n_remove: int, blocks: Tensor | None = None,
              removable: Tensor | None = None, where: str = "layer") -> tuple[Tensor, Tensor]:
    """One-shot structured OBC (the paper's variant, Algorithm 2) -> (kept block ids ascending, new weight).

    Scores every block once (`obc_scores`), removes the `n_remove` lowest among the `removable`
    ones (ties: the higher index goes, as in `base.select_top`), and applies the unified
    compensation of Eq. 10 to the kept columns. The returned weight has H^-1's dtype, full width, with
    the removed columns zeroed.
    """
    b, ok = _removal(weight, hinv, n_remove, blocks, removable)
    scores = obc_scores(weight, hinv, None if blocks is None else b, where).cpu()
    if not bool(torch.isfinite(scores[ok]).all()):
        raise FangError(f"{where}: OBC scores are not finite; increase prune.damp")
    scores = torch.where(ok, scores, torch.full_like(scores, float("inf")))
    keep = select_top(scores, b.shape[0] - n_remove)
    gone = torch.ones(b.shape[0], dtype=torch.bool)
    gone[keep] = False
    new_w = obc_compensate(weight, hinv, b[gone].reshape(-1), where)
    _require_finite(new_w, where)
    return keep, new_w


def obc_prune_iterative(weight: Tensor, hinv: Tensor, n_remove: int, blocks: Tensor | None = None,
                        removable: Tensor | None = None, where: str = "layer") -> tuple[Tensor, Tensor]:
    """Traditional greedy OBC (Algorithm 1) -> (kept block ids ascending, new weight in H^-1's dtype).

    Repeats `n_remove` times: score the remaining removable blocks, remove the cheapest (ties: the
    higher index), compensate with Eq. 10 for that block alone, and eliminate its columns from
    H^-1 by the Schur complement  H^-1 <- H^-1 - H^-1_:M ([H^-1]_MM)^-1 H^-1_M:, which is the
    inverse Hessian of the remaining columns (removed ones become zero rows/columns).
    """
    b, ok = _removal(weight, hinv, n_remove, blocks, removable)
    w = weight.detach().to(device=hinv.device, dtype=hinv.dtype).clone()
    h = hinv.detach().clone()
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
    scores = torch.full((blocks.shape[0],), float("inf"), dtype=h.dtype)
    idx = torch.nonzero(cand).reshape(-1)
    if idx.numel():
        scores[idx] = obc_scores(w, h, blocks[idx], where).cpu()
    return scores


def _require_finite(w: Tensor, where: str) -> None:
    if not bool(torch.isfinite(w).all()):
        raise FangError(f"{where}: OBC compensation produced NaN/Inf weights; increase prune.damp")


class ObcPruner:
    """Structured OBC on one Linear input: the Hessian of its calibration inputs, then one-shot
    (`obc_prune`) or greedy (`obc_prune_iterative`) removal with compensation of the kept columns."""

    def __init__(self, n_channels: int, damp: float = 0.01, where: str = "layer",
                 device: torch.device | str = "cpu", iterative: bool = False) -> None:
        self.n_channels, self.damp, self.where, self.iterative = n_channels, damp, where, iterative
        self.hessian = HessianAccumulator(n_channels, device)
        self._hinv: Tensor | None = None

    def add_batch(self, x: Tensor) -> None:
        self._hinv = None
        self.hessian.add_batch(x)

    def inverse(self) -> Tensor:
        """(H + damp * mean(diag H) * I)^-1 of the inputs streamed so far (`inverse_hessian`), computed once
        for a wrapper that needs it too (`dense_target.DenseTargetPruner`)."""
        if self._hinv is None:
            self._hinv = inverse_hessian(self.hessian.hessian, self.damp, self.where)
        return self._hinv

    def select(self, weight: Tensor, n_keep: int, units: Tensor | None = None) -> Selection:
        units = checked_units(weight, self.n_channels, n_keep, units, self.where)
        n_units = units.shape[0]
        if n_keep == n_units:  # nothing to remove: no Hessian to invert
            return Selection(torch.arange(n_units))
        hinv = self.inverse()
        single = units.shape[1] == 1 and torch.equal(units[:, 0], torch.arange(self.n_channels))
        prune_fn = obc_prune_iterative if self.iterative else obc_prune
        keep, new_w = prune_fn(weight.detach(), hinv, n_units - n_keep, None if single else units, where=self.where)
        return Selection(keep.cpu(), weight=new_w)


class Obc(PruningMethod):
    """Structured OBC, one-shot (the FANG paper's Algorithm 2) on heads and neurons."""

    iterative = False

    def attention(self, ctx: LayerContext) -> ObcPruner:
        return ObcPruner(ctx.layer.self_attn.o_proj.in_features, self.options.damp, ctx.where("o_proj"), ctx.device,
                         self.iterative)

    def ffn(self, ctx: LayerContext) -> ObcPruner:
        return ObcPruner(ctx.n_ffn, self.options.damp, ctx.where("down_proj"), ctx.device, self.iterative)
