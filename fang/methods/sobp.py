"""SoBP: Structured Optimal Brain Pruning (Wei et al., EMNLP 2024), as tensor functions and the method.

The paper's three steps (abstract: "global first-order information to select pruning structures, then
refines them with a local greedy approach, and finally adopts module-wise reconstruction"); what the
paper leaves open, or what could not be read here, is chosen and marked in docs/methods.md ("SoBP"):

1. **Global first-order selection** (`first_order_scores`, the method's `global_scores`): one
   forward+backward pass of the dense model over the calibration tokens gives, for every attention unit
   and FFN neuron of every block, the first-order Taylor estimate of the change of the mean calibration
   loss when its mask goes from 1 to 0, |dL/dm| = |sum_t sum_(c in unit) a_tc * dL/da_tc| / T (a: the
   input of o_proj or down_proj). The plan ranks every structure of every block in one pool by that loss
   change per removed parameter and cuts the pool at the target sparsity (`plan.first_order_plan` on
   `plan.structure_search`, the search FLAP's allocation uses, here on SoBP's scores): this fixes how many
   units and neurons each block keeps (a heterogeneous allocation). The prune report gives each block's
   `first_order_loss_change`, the sum of its units' scores per kind.
2. **Local greedy refinement** (`SobpPruner.select`): within each block, which units go is chosen again
   by greedy Optimal Brain Surgeon on the layer's Hessian (`obc.obc_prune_iterative`: remove the unit
   whose removal with optimal compensation costs least, update H^-1, rescore), at the count of step 1.
3. **Module-wise reconstruction** (`dense_target.module_target_weight`, shared with O-FANG's
   `prune.compensation: dense`): the kept columns of o_proj / down_proj are
   refit so the module reproduces the *dense* model's module output on the *pruned* model's inputs,
   min ||Y_dense - W'_K X_K||^2, instead of the layer's own output on those inputs (what OBC does).
   With W* = argmin ||Y_dense - W X||^2 over all columns, the cost splits exactly into
   ||Y_dense - W* X||^2 + ||W* X - W'_K X_K||^2 (the first residual is orthogonal to every column of X),
   so step 2 run on W* instead of W minimises the module-wise objective: the OBS machinery is unchanged.
   Dampening (prune.damp, as OBC) makes W* = W + (C - W H)(H + lambda I)^-1 with C = Y_dense X^T, the
   ridge solution shrunk towards the dense weight; with the dense model's own inputs C = W H and W* = W.

The dense stream (the dense model's hidden states and module outputs over the calibration tokens) is
run by the method itself (`dense_target.DenseStream`), one block ahead of the driver's pruned stream, while
each block is still dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..analysis.taylor import loss_grad
from ..core.errors import FangError, require
from ..model.layerwise import BlockRunner, batch_slices
from ..model.modeling import decoder_layers
from .base import LayerContext, PruningMethod
from .dense_target import DenseStream, DenseTargetPruner, capture_token_ids, check_token_ids
from .dense_target import module_target_weight  # noqa: F401  (its home before dense_target; imported from here)
from .obc import ObcPruner
from .units import AttentionUnits, UnitScores


# ----------------------------------------------------------------------------- step 1: global first order


def mask_gradient(x: Tensor, grad: Tensor, units: Tensor | None = None) -> Tensor:
    """sum over tokens of x * dL/dx per input channel, summed over each unit's columns -> [n_units] float64.

    That is dL/dm for a mask m multiplying the unit's columns of a Linear input x [..., C] (at m = 1);
    `units` [n_units, width] column ids, None = every column its own unit. Signed: sum over batches
    before taking the magnitude (`first_order_scores`).
    """
    require(x.shape == grad.shape, f"mask_gradient: input {tuple(x.shape)} and gradient {tuple(grad.shape)} differ")
    c = x.shape[-1]
    per_col = (x.reshape(-1, c).double() * grad.reshape(-1, c).double()).sum(0).cpu()
    if units is None:
        return per_col
    return per_col[units.cpu()].sum(1)


def _block_graph(runner: BlockRunner, layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_in, x_out, o_proj input, down_proj input) of one block run with grad on, the inputs with their graph."""
    x_in = x.to(runner.device).detach().requires_grad_(True)
    caught: dict[str, Tensor] = {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: caught.__setitem__("o", a[0])),
             layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: caught.__setitem__("d", a[0]))]
    try:
        with torch.enable_grad():
            x_out = runner(layer, x_in)
    finally:
        for h in hooks:
            h.remove()
    return x_in, x_out, caught["o"], caught["d"]


def first_order_scores(model: nn.Module, input_ids: Tensor, unit_columns: Tensor, batch_size: int,
                       device: torch.device | str) -> tuple[list[Tensor], list[Tensor]]:
    """|dL/dm| of every attention unit and FFN neuron of every block -> ([n_units] per block, [n_ffn] per block).

    L is the mean next-token loss over the calibration tokens `input_ids` [N, L]; m a mask on the unit's
    o_proj input columns (`unit_columns` [n_units, width]) or on the neuron's down_proj input. The
    backward runs block by block from stored block inputs, as `fang.analysis.taylor` does (memory of one
    block's graph, not the model's depth); the signed gradients are summed over the whole calibration
    set before the magnitude is taken (the first-order Taylor term of the loss, not a sum of per-token
    magnitudes).
    """
    require(input_ids.dim() == 2 and input_ids.numel() > 0,
            f"first_order_scores: token ids must be [N, L], got {tuple(input_ids.shape)}")
    require(input_ids.shape[1] >= 2, "first_order_scores: sequences need at least 2 tokens (one prediction)")
    require(batch_size > 0, f"first_order_scores: batch_size={batch_size} must be positive")
    device = torch.device(device)
    layers = decoder_layers(model)
    n_layers = len(layers)
    attn = [torch.zeros(unit_columns.shape[0], dtype=torch.float64) for _ in range(n_layers)]
    mlp = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # only activation gradients are needed
    runner = BlockRunner(model, device)
    try:
        for sl in batch_slices(input_ids.shape[0], batch_size):
            ids = input_ids[sl].to(device)
            with torch.no_grad():
                hidden = runner.embed(ids)
                inputs = []
                for li, layer in enumerate(layers):
                    inputs.append(hidden.cpu())
                    with runner.on_device(li):
                        hidden = runner(layer, hidden)
            grad = loss_grad(model, hidden, ids)
            del hidden
            for li in reversed(range(n_layers)):
                with runner.on_device(li):
                    x_in, x_out, a, h = _block_graph(runner, layers[li], inputs.pop())
                    grad_in, grad_a, grad_h = torch.autograd.grad(x_out, (x_in, a, h), grad)
                attn[li] += mask_gradient(a.detach(), grad_a, unit_columns)
                mlp[li] += mask_gradient(h.detach(), grad_h)
                grad = grad_in
                del x_in, x_out, a, h, grad_a, grad_h
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    n_pred = input_ids.shape[0] * (input_ids.shape[1] - 1)  # loss_grad's sum over predicted tokens -> mean
    attn = [(s / n_pred).abs() for s in attn]
    mlp = [(s / n_pred).abs() for s in mlp]
    for kind, scores in (("attention", attn), ("FFN", mlp)):
        if not all(bool(torch.isfinite(s).all()) for s in scores):
            raise FangError(f"sobp: first-order {kind} scores are not finite "
                            "(NaN/Inf loss gradients on the calibration data)")
    return attn, mlp


# ------------------------------------------------------------------- steps 2 and 3: local greedy + module-wise


class SobpPruner(DenseTargetPruner):
    """One Linear input (o_proj or down_proj) of one block: the Hessian of its pruned-stream inputs, their
    cross moment with the dense module outputs (`targets`, the driver's token order), then greedy OBS
    (step 2, `ObcPruner(iterative=True)`) on the module-wise target weight (step 3,
    `dense_target.DenseTargetPruner`). `targets` None: reconstruct the layer's own output (greedy OBC)."""

    def __init__(self, n_channels: int, damp: float, where: str, device: torch.device | str,
                 targets: Tensor | None = None) -> None:
        super().__init__(ObcPruner(n_channels, damp, where, device, iterative=True), targets)


@dataclass
class SobpInputs:
    """What SoBP reads besides the model: the calibration token ids the driver prunes on (the capture's)
    and the batch size of its own passes (prune.batch_size)."""

    token_ids: Tensor  # [N, L] long
    batch_size: int = 8

    def validate(self) -> None:
        require(self.token_ids.dim() == 2 and self.token_ids.numel() > 0,
                f"sobp: calibration token ids must be [N, L], got {tuple(self.token_ids.shape)}")
        require(self.batch_size > 0, f"sobp: batch_size={self.batch_size} must be positive")


def _execution_device(model: nn.Module) -> torch.device:
    # the embeddings stay on the execution device whether or not the blocks stream (fang.model.offload)
    return model.get_input_embeddings().weight.device


class Sobp(PruningMethod):
    """SoBP on heads (or GQA units, prune.gqa) and FFN neurons: first-order global allocation (its `auto`),
    greedy OBS within each block, module-wise reconstruction against the dense model's module outputs."""

    # step 1 fixes only how many units each block keeps; step 2 chooses which at whatever count it is given, so
    # under prune.align the greedy OBS runs at the aligned width (the plan's largest-remainder rounding)
    aligns_own_search = True

    @property
    def module_wise(self) -> bool:
        """Step 3 on (the default compensation): refit to the dense model's module outputs. `sobp+layer` turns it
        off, each layer refit to its own output on its pruned inputs (OBC's target): the ablation that
        separates step 3 from the first-order allocation and the greedy selection."""
        return self.options.compensation != "layer"

    def __init__(self, name, options, inputs=None) -> None:
        super().__init__(name, options, inputs)
        self._stream: DenseStream | None = None  # the dense model's stream, one block ahead (step 3)
        self._mlp_targets: Tensor | None = None

    @classmethod
    def load_inputs(cls, art, params_path: str = "params.yaml", options=None) -> SobpInputs:
        from ..core.params import load_block

        return SobpInputs(capture_token_ids(art.capture), load_block("prune", path=params_path).batch_size)

    def check(self, model: nn.Module) -> None:
        require(isinstance(self.inputs, SobpInputs),
                "prune.method=sobp needs the calibration token ids "
                "(SobpInputs: `Sobp.load_inputs` reads the capture's)")
        self.inputs.validate()
        check_token_ids(self.inputs.token_ids, model.config.vocab_size, "sobp")
        if self.module_wise:
            self._stream = DenseStream(model, self.inputs.token_ids, self.inputs.batch_size, "sobp")

    def global_scores(self, model: nn.Module, units: AttentionUnits) -> UnitScores:
        """Step 1's scores, |dL/dm| of every attention unit and neuron of every block (`first_order_scores`), which
        the plan ranks globally (`plan.first_order_plan`, or per module type `plan.first_order_split_plan`)."""
        return UnitScores(*first_order_scores(model, self.inputs.token_ids, units.unit_columns(),
                                              self.inputs.batch_size, _execution_device(model)))

    def attention(self, ctx: LayerContext) -> SobpPruner:
        o_targets = None
        if self.module_wise:
            require(self._stream is not None, "sobp: check(model) must run before the blocks are pruned")
            o_targets, self._mlp_targets = self._stream.targets(ctx)  # the block's dense outputs, before pruning it
        return SobpPruner(ctx.layer.self_attn.o_proj.in_features, self.options.damp, ctx.where("o_proj"), ctx.device,
                          o_targets)

    def ffn(self, ctx: LayerContext) -> SobpPruner:
        targets, self._mlp_targets = self._mlp_targets, None
        return SobpPruner(ctx.n_ffn, self.options.damp, ctx.where("down_proj"), ctx.device, targets)
