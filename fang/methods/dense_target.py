"""Refitting a pruned module to the *dense* model's module output: the shared home of SoBP's step 3
("module-wise reconstruction", `fang.methods.sobp`) and of O-FANG's `prune.compensation: dense` (ours).

OBC refits the kept columns of o_proj / down_proj so the layer reproduces its *own* output on the
pruned model's inputs X (the sequential pass): min ||W X - W'_K X_K||^2. The refit here targets the
dense model's module output Y instead, for the same tokens: min ||Y - W'_K X_K||^2, so the error that
the earlier pruned blocks put into X is corrected as well, rather than carried along.

With H = mean x x^T, C = mean y x^T (x: the pruned-stream input of a token, y: the dense module's output
for it) and W* = argmin ||Y - W X||^2 + lambda ||W - W_dense||^2 = W + (C - W H)(H + lambda I)^-1
(`module_target_weight`), the objective splits exactly into ||Y - W* X||^2 + ||W* X - W'_K X_K||^2 (the
first residual is orthogonal to every column of X, up to the ridge term), so OBS / OBC run on W* in place
of W (`obc_compensate(W*, H^-1, gone)`, `ObcPruner` on W*) choose and refit for the module-wise objective.

The dense outputs come from `DenseStream`: the dense model's hidden states over the calibration tokens,
advanced one block ahead of the driver's pruned stream, while each block is still dense. `CrossMoment`
accumulates C in the driver's token order; `DenseTargetPruner` wraps an `ObcPruner` with it.

Cost: one extra forward of the calibration set through the dense blocks, and on the host the dense
hidden states plus one block's o_proj and down_proj targets, 3 x N x L x d float32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.errors import require
from ..model.layerwise import BlockRunner, batch_slices, embed_tokens
from ..model.modeling import decoder_layers
from .base import LayerContext, Selection, checked_units
from .obc import ObcPruner


def module_target_weight(weight: Tensor, hessian: Tensor, cross: Tensor, hinv: Tensor) -> Tensor:
    """W* = W + (C - W H) H_damp^-1: the weight whose output on the pruned inputs best matches the dense
    module output, min ||Y - W X||^2 + lambda ||W - W_dense||^2 (in H^-1's dtype).

    `hessian` H = mean x x^T and `cross` C = mean y x^T over the same tokens (y: the dense module's output
    for the token whose pruned-model input is x); `hinv` = (H + lambda I)^-1 (`obc.inverse_hessian`).
    The residual C - W H is formed in float64: it is small where the streams agree, and float32 would
    lose it to cancellation.
    """
    require(weight.dim() == 2 and cross.shape == weight.shape,
            f"module_target_weight: weight {tuple(weight.shape)} and cross moment {tuple(cross.shape)} differ")
    n = weight.shape[1]
    require(hessian.shape == (n, n) and hinv.shape == (n, n),
            f"module_target_weight: Hessian {tuple(hessian.shape)} / inverse {tuple(hinv.shape)} for {n} input columns")
    w64 = weight.detach().to(device=hinv.device, dtype=torch.float64)
    h64 = hessian.to(device=hinv.device, dtype=torch.float64)
    resid = cross.to(device=hinv.device, dtype=torch.float64) - w64 @ h64
    return (w64 + resid @ hinv.to(torch.float64)).to(hinv.dtype)


def capture_token_ids(capture: str | Path) -> Tensor:
    """The calibration token ids the driver prunes on, [N, L] long, read from the capture store: what a dense
    stream (and SoBP's first-order pass) runs."""
    from ..analysis.capture import open_capture

    return torch.from_numpy(open_capture(capture)["token_ids"][:].astype("int64"))


def check_token_ids(token_ids: Tensor, vocab_size: int, who: str) -> None:
    """One line naming `who` when calibration token ids fall outside the model's vocabulary."""
    lo, hi = int(token_ids.min()), int(token_ids.max())
    require(lo >= 0 and hi < vocab_size, f"{who}: calibration token ids span {lo}..{hi}, the model's vocabulary has "
                                         f"{vocab_size} entries")


class CrossMoment:
    """sum over tokens of y x^T (float64 [out, C]) of one Linear input x against the dense module outputs
    `targets` [T, out] (float32, host), which are in the driver's token order: the i-th streamed token
    pairs with row i. The stream must deliver exactly T tokens (`mean` checks)."""

    def __init__(self, targets: Tensor, where: str = "layer") -> None:
        require(targets.dim() == 2, f"{where}: dense targets must be [tokens, out], got {tuple(targets.shape)}")
        self.targets, self.where = targets, where
        self.sum: Tensor | None = None
        self.cursor = 0

    def add_batch(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        end = self.cursor + rows.shape[0]
        require(end <= self.targets.shape[0],
                f"{self.where}: the driver streamed more tokens than the dense stream holds "
                f"({self.targets.shape[0]}): the calibration token ids differ")
        y = self.targets[self.cursor:end].to(device=rows.device, dtype=torch.float64)
        part = y.T @ rows.double()
        self.sum = part if self.sum is None else self.sum + part
        self.cursor = end

    def mean(self) -> Tensor:
        """C = mean y x^T over the streamed tokens (the same tokens, unweighted, as the layer Hessian)."""
        require(self.cursor == self.targets.shape[0] and self.sum is not None,
                f"{self.where}: the driver streamed {self.cursor} tokens, the dense stream holds "
                f"{self.targets.shape[0]}: the calibration token ids differ")
        return self.sum / self.cursor


class DenseStream:
    """The dense model's stream over the calibration tokens `token_ids` [N, L], one block ahead of the
    driver's pruned one: `targets(ctx)` runs block ctx.index while it is still dense (the driver calls it
    before pruning that block) and returns its o_proj and down_proj outputs ([N * L, d] float32 host each,
    in the driver's token order). Blocks must come in order; the state is released after the last one.
    `name` prefixes its errors (the method's name)."""

    def __init__(self, model: nn.Module, token_ids: Tensor, batch_size: int, name: str = "dense stream") -> None:
        require(token_ids.dim() == 2 and token_ids.numel() > 0,
                f"{name}: calibration token ids must be [N, L], got {tuple(token_ids.shape)}")
        require(batch_size > 0, f"{name}: batch_size={batch_size} must be positive")
        self.model, self.token_ids, self.batch_size, self.name = model, token_ids, batch_size, name
        self.n_layers = len(decoder_layers(model))
        self._hidden: Tensor | None = None  # the dense hidden states entering the next block [N, L, d]
        self._next = 0

    def targets(self, ctx: LayerContext) -> tuple[Tensor, Tensor]:
        require(ctx.index == self._next,
                f"{self.name}: blocks must be pruned in order (got {ctx.index}, expected {self._next})")
        ids, bs = self.token_ids, self.batch_size
        if self._hidden is None:
            self._hidden = embed_tokens(self.model, ids, bs, ctx.device)
        runner = BlockRunner(self.model, ctx.device)
        d = self.model.config.hidden_size
        n_tok = ids.numel()
        outs = {"o": torch.empty(n_tok, d), "d": torch.empty(n_tok, d)}
        at = {"o": 0, "d": 0}

        def keep(name):
            def hook(_m, _a, out):
                rows = out.detach().reshape(-1, d).float().cpu()
                outs[name][at[name]:at[name] + rows.shape[0]] = rows
                at[name] += rows.shape[0]
            return hook

        attn, mlp = ctx.layer.self_attn, ctx.layer.mlp
        hooks = [attn.o_proj.register_forward_hook(keep("o")), mlp.down_proj.register_forward_hook(keep("d"))]
        try:
            with torch.no_grad():
                for sl in batch_slices(ids.shape[0], bs):
                    self._hidden[sl] = runner(ctx.layer, self._hidden[sl]).float().cpu()
        finally:
            for h in hooks:
                h.remove()
        self._next += 1
        if self._next == self.n_layers:
            self._hidden = None  # the last block: the dense stream is no longer needed
        return outs["o"], outs["d"]


class DenseTargetPruner:
    """An `ObcPruner` (one-shot or greedy) that selects and refits on the module-wise target weight W*
    instead of the layer's own weight: `add_batch` feeds its Hessian and the cross moment with `targets`
    (the dense module outputs, `DenseStream`); `select` forms W* and runs the inner selection on it.
    Nothing to remove still returns W* (the refit alone lowers the module-wise error). `targets` None:
    the inner pruner unchanged (the layer's own output as the target, OBC)."""

    def __init__(self, inner: ObcPruner, targets: Tensor | None = None) -> None:
        self.inner = inner
        self.moment = None if targets is None else CrossMoment(targets, inner.where)

    @property
    def hessian(self):
        """The inner pruner's `HessianAccumulator` (the plain mean x x^T of the streamed inputs)."""
        return self.inner.hessian

    @property
    def cross(self) -> Tensor | None:
        """sum over the streamed tokens of y x^T, float64 [out, C] (None before any batch or without targets)."""
        return None if self.moment is None else self.moment.sum

    @cross.setter
    def cross(self, value: Tensor | None) -> None:  # tests put an exact float64 moment in
        require(self.moment is not None, f"{self.inner.where}: no dense targets to hold a cross moment for")
        self.moment.sum = value

    def add_batch(self, x: Tensor) -> None:
        if self.moment is not None:
            self.moment.add_batch(x)
        self.inner.add_batch(x)

    def target_weight(self, weight: Tensor) -> Tensor:
        """W* for `weight` from the streamed statistics (H^-1's dtype)."""
        inner = self.inner
        hinv = inner.inverse()
        return module_target_weight(weight.detach(), inner.hessian.hessian, self.moment.mean(), hinv)

    def select(self, weight: Tensor, n_keep: int, units: Tensor | None = None) -> Selection:
        if self.moment is None:
            return self.inner.select(weight, n_keep, units)
        units = checked_units(weight, self.inner.n_channels, n_keep, units, self.inner.where)
        w_star = self.target_weight(weight)
        if n_keep == units.shape[0]:
            return Selection(torch.arange(units.shape[0]), weight=w_star)
        return self.inner.select(w_star, n_keep, units)
