"""The layer-wise pruning driver shared by every method.

Sequential: block l is pruned using statistics of its inputs as produced by the already pruned
blocks 0..l-1, then the pruned block is rerun so its outputs feed block l+1's statistics. Within a
block, one pass over the calibration batches collects everything both sublayers need (the inputs
of o_proj and down_proj, and for FANG the token clusters of the MLP input), as FLAP does.

Methods (`prune_model(method=...)`) are the registered ones (`fang.core.registry`), each a
`fang.methods.base.PruningMethod` in its own module: flap, wanda_sp, magnitude, obc, obc_iter,
f_fang, o_fang, ... The driver knows none of them by name. What every block keeps is planned
before any block is touched (`fang.methods.plan.plan_pruning`: the allocation, FLAP's structure search
or the per-block sparsities, and the keep counts); the driver only runs the sequential pass with those
counts. Every method really shrinks the model (`fang.model.shrink`).

Precision (model.compute_dtype). The blocks run in the model's dtype, which the prune stage loads it
in; float32, or bfloat16/float16 as SparseGPT and FLAP run theirs. Whatever it is, the methods'
statistics are accumulated from float32/float64 copies of the activations (`stats.InputStats`,
`obc.HessianAccumulator`), scores and the OBC/FLAP solves run in float32 or float64 on float copies
of the weights, and only the result is cast back to the model's dtype when it is written into the
block (`_apply_attention`, `_apply_mlp`, `fang.model.shrink`).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import require
from ..core.progress import progress
from ..core.registry import method_spec
from ..model.layerwise import BlockRunner, batch_slices, embed_tokens, input_hooks
from ..model.modeling import count_block_params, decoder_layers
from ..model.offload import block_on_device, place_model
from ..model.shrink import shrink_attention, shrink_mlp
from .base import LayerContext, PruningMethod, Selection
from .plan import Plan, plan_pruning
from .units import AttentionUnits, PruneOptions

# Calibration sequences on which the per-block reconstruction error is measured (bounds its memory).
DIAGNOSTIC_SEQUENCES = 8


@dataclass
class PruneReport:
    method: str
    target_sparsity: float
    dense_block_params: int = 0
    pruned_block_params: int = 0
    layers: list[dict] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    compute_dtype: str = "float32"  # the dtype the blocks ran in (model.compute_dtype, resolved)
    # the largest structure removed at once, as a fraction of the dense block parameters: the granularity the
    # target is met within (`AttentionUnits.unit_fraction`); not written (the report's bytes stay as they were)
    unit_fraction: float = 0.0

    @property
    def achieved_sparsity(self) -> float:
        return 1.0 - self.pruned_block_params / max(self.dense_block_params, 1)

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "target_sparsity": self.target_sparsity,
            # float32 is left out: reports made in it keep the bytes they had before the option existed
            **({} if self.compute_dtype == "float32" else {"compute_dtype": self.compute_dtype}),
            "achieved_sparsity": round(self.achieved_sparsity, 6),
            "kv_heads_kept": sum(int(e.get("kv_heads", 0)) for e in self.layers),
            "neurons_kept": sum(int(e.get("ffn", 0)) for e in self.layers),
            "groups_without_tokens": sum(len(e.get("groups_without_tokens", [])) for e in self.layers),
            "empty_clusters": sum(int(e.get("empty_clusters", 0)) for e in self.layers),
            "dense_block_params": self.dense_block_params,
            "pruned_block_params": self.pruned_block_params,
            "options": self.options,
            "layers": self.layers,
        }


def _apply_attention(attn: nn.Module, units: AttentionUnits, sel: Selection) -> tuple[int, int]:
    if sel.weight is not None:  # OBC: compensated full-width weight; shrinking then drops the removed columns
        attn.o_proj.weight.data.copy_(sel.weight.to(attn.o_proj.weight.dtype))
    keep_kv, keep_slots = units.keep_indices(sel.keep)
    bias = None if sel.bias is None else sel.bias.float()
    shrink_attention(attn, keep_kv, keep_slots, bias)
    return len(keep_kv) * len(keep_slots), len(keep_kv)


def _apply_mlp(mlp: nn.Module, sel: Selection) -> int:
    if sel.weight is not None:
        mlp.down_proj.weight.data.copy_(sel.weight.to(mlp.down_proj.weight.dtype))
    bias = None if sel.bias is None else sel.bias.float()
    shrink_mlp(mlp, sel.keep, bias)
    return len(sel.keep)


class OutputRecorder:
    """Outputs of o_proj and down_proj on the first calibration sequences, before and after pruning.

    Gives the per-block relative reconstruction error ||W X - W' X'||^2 / ||W X||^2, where X is the
    input the block receives in the sequential pass and X' the input its pruned sublayer sees
    (for down_proj that includes the effect of pruning the same block's attention).
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.dense: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.pruned: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    @contextlib.contextmanager
    def record(self, into: dict[str, list[torch.Tensor]]):
        handles = [
            m.register_forward_hook(lambda _m, _a, out, name=name: into[name].append(out.detach().double().cpu()))
            for name, m in self.modules.items()
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def relative_errors(self) -> dict[str, float]:
        out = {}
        for name in self.modules:
            if not self.dense[name]:
                continue
            y, y_hat = torch.cat(self.dense[name]), torch.cat(self.pruned[name])
            out[name] = float((y - y_hat).square().sum() / y.square().sum().clamp(min=1e-300))
        return out


def method_class(name: str) -> type[PruningMethod]:
    """The implementation of a registered method (imported by name: see `fang.core.registry`)."""
    spec = method_spec(name)
    return getattr(importlib.import_module(f"{__package__}.{spec.module}"), spec.cls)


@torch.no_grad()
def prune_sequential(
    model: nn.Module,
    start_hidden: torch.Tensor | None,
    method: PruningMethod,
    plan: Plan,
    batch_size: int,
    device: torch.device,
) -> list[dict]:
    """Prune every block in order with `method`, keeping the `plan`'s `keep_attn[l]` attention units and
    `keep_mlp[l]` neurons; each block's line of the report ends with the plan's note on it (`Plan.notes`)."""
    keep_attn, keep_mlp, units = plan.keep_attn, plan.keep_mlp, plan.units
    layers = decoder_layers(model)
    uses_data = method.needs_data  # magnitude needs no activations, so no forward pass at all
    runner = BlockRunner(model, device) if uses_data else None
    hidden = start_hidden.float().cpu() if uses_data else None
    n_seq = hidden.shape[0] if uses_data else 0
    n_diag = min(n_seq, DIAGNOSTIC_SEQUENCES)
    unit_cols = units.unit_columns()
    out_layers = []
    with progress() as bar:
        task = bar.add_task(f"prune {method.name}", total=len(layers))
        for li, layer in enumerate(layers):
            # keep=True: a streamed block leaves the device pruned, and its pruned weights wait on the host
            with block_on_device(model, li, keep=True):
                attn, mlp = layer.self_attn, layer.mlp
                entry: dict = {"layer": li}
                ctx = LayerContext(li, layer, units, method.options, device, keep_attn[li], keep_mlp[li], entry)
                attn_pruner = method.attention(ctx)
                mlp_pruner = method.ffn(ctx)
                recorder = OutputRecorder({"o_proj": attn.o_proj, "down_proj": mlp.down_proj})
                dense_params = sum(p.numel() for p in layer.parameters())

                if uses_data:

                    def sink(name: str, x: torch.Tensor) -> None:
                        if name == "o":
                            attn_pruner.add_batch(x)
                        elif name == "ffn_in":  # runs before down_proj's hook in the same MLP call
                            mlp_pruner.add_ffn_input(x)
                        else:
                            mlp_pruner.add_batch(x)

                    hooks = {"o": attn.o_proj, "d": mlp.down_proj}
                    if method.needs_ffn_input:
                        hooks["ffn_in"] = mlp
                    with input_hooks(hooks, sink):
                        for sl in batch_slices(n_seq, batch_size):
                            diag = sl.start < n_diag
                            with recorder.record(recorder.dense) if diag else contextlib.nullcontext():
                                runner(layer, hidden[sl])

                attn_sel = attn_pruner.select(attn.o_proj.weight, keep_attn[li], unit_cols)
                mlp_sel = mlp_pruner.select(mlp.down_proj.weight, keep_mlp[li])
                heads, kv_heads = _apply_attention(attn, units, attn_sel)
                ffn = _apply_mlp(mlp, mlp_sel)
                # shrinking replaced the Linear modules: record the new ones
                recorder.modules = {"o_proj": attn.o_proj, "down_proj": mlp.down_proj}
                if uses_data:
                    for sl in batch_slices(n_seq, batch_size):
                        diag = sl.start < n_diag
                        with recorder.record(recorder.pruned) if diag else contextlib.nullcontext():
                            hidden[sl] = runner(layer, hidden[sl]).float().cpu()
                # achieved fraction of this block's parameters removed (FLAP's added biases count as kept)
                entry["sparsity"] = round(1.0 - sum(p.numel() for p in layer.parameters()) / dense_params, 6)
                entry.update(heads=heads, kv_heads=kv_heads, ffn=ffn, **mlp_sel.info)
                errors = recorder.relative_errors()
                if errors:
                    entry["relative_error"] = {name: round(v, 8) for name, v in errors.items()}
                method.finish_layer(ctx, mlp_sel)
                if plan.notes is not None:
                    entry.update(plan.notes[li])
            out_layers.append(entry)
            bar.advance(task)
    return out_layers


def prune_model(
    model: nn.Module,
    capture,
    method: str,
    sparsity: float,
    gqa_scheme: str = "kv_group",
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    *,
    options: PruneOptions | None = None,
    inputs: Any = None,
    art=None,
) -> PruneReport:
    """Prune `model` in place with `method` to `sparsity` of its decoder-block parameters.

    `capture` is the dense capture store (`fang.analysis.capture.open_capture`): its token ids start the
    sequential pass (block 0's input recomputed in float32) and FLAP's structure search reads its
    statistics. `inputs` is what the method's `load_inputs` reads from its analysis artifacts
    (f_fang / o_fang: `FangInputs`, the cluster, grouping and allocation artifacts, whose block scores the
    plan turns into each block's sparsity at `sparsity`). `art`, the calibration set's artifacts
    (`fang.core.paths.CalibrationArtifacts`), gives the fc and taylor allocations' block scores when
    `options.block_sparsity` does not give their per-block sparsity. Everything is planned in one call
    (`fang.methods.plan.plan_pruning`) before the sequential pass.
    """
    method_spec(method)  # FangError naming the registered methods if unknown
    options = options or PruneOptions()
    options.validate()
    require(
        isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) < 1.0,
        f"prune.sparsity={sparsity} is out of range: it must be in [0, 1)",
    )
    require(batch_size > 0, f"prune.batch_size={batch_size} must be positive")
    pruning = method_class(method)(method, options, inputs)
    pruning.check(model)
    device = torch.device(device)
    place_model(model, device)
    report = PruneReport(method, float(sparsity), dense_block_params=count_block_params(model),
                         compute_dtype=str(model.get_input_embeddings().weight.dtype).removeprefix("torch."))
    plan = plan_pruning(model, capture, pruning, float(sparsity), gqa_scheme, options, art)
    report.unit_fraction = plan.units.unit_fraction(report.dense_block_params)
    report.options = {**options.as_dict(), "allocation": plan.allocation,
                      "block_sparsity": None if plan.block_sparsity is None else [float(s) for s in plan.block_sparsity]}
    if plan.removes_nothing:
        report.pruned_block_params = report.dense_block_params
        return report

    start_hidden = None
    if pruning.needs_data:
        # recomputed from the token ids in the model's precision: the store's copy would be fp16
        token_ids = torch.from_numpy(capture["token_ids"][:].astype("int64"))
        start_hidden = embed_tokens(model, token_ids, batch_size, device)
    report.layers = prune_sequential(model, start_hidden, pruning, plan, batch_size, device)
    if plan.unaligned_mlp is not None:  # prune.align > 1: what the allocation asked before rounding
        for entry, width in zip(report.layers, plan.unaligned_mlp):
            entry["ffn_unaligned"] = int(width)
    report.pruned_block_params = count_block_params(model)
    return report
