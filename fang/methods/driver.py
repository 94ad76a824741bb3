"""The layer-wise pruning driver shared by every method.

Sequential: block l is pruned using statistics of its inputs as produced by the already pruned
blocks 0..l-1, then the pruned block is rerun so its outputs feed block l+1's statistics. Within a
block, one pass over the calibration batches collects everything both sublayers need (the inputs
of o_proj and down_proj, and for FANG the token clusters of the MLP input), as FLAP does.

Methods (`prune_model(method=...)`) are the registered ones (`fang.methods.registry`), each a
`fang.methods.base.PruningMethod` in its own module: flap, wanda_sp, magnitude, obc, obc_iter,
f_fang, o_fang, ... The driver knows none of them by name. Keep counts per block come from the
allocation: FLAP's global AL-AM search on the dense capture (`flap_search`), the method's own plan
(`PruningMethod.plan`), or one sparsity per block (`sparsity` everywhere, a per-block list
`PruneOptions.block_sparsity`, or the method's own `block_sparsity()` such as FANG's allocation).
For per-block sparsities, heads (GQA units) are rounded to that fraction and the FFN neurons absorb
the rounding (`flap.param_matched_structure`). Every method really shrinks the model (`fang.model.shrink`).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..analysis.cluster import RELEVANCE_MODES
from ..core.choices import ALLOCATIONS, COMPENSATIONS, resolve_allocation
from ..core.errors import require
from ..core.progress import progress
from ..model.layerwise import BlockRunner, batch_slices, embed_tokens, input_hooks
from ..model.modeling import attention_geometry, count_block_params, decoder_layers
from ..model.offload import block_on_device, place_model
from ..model.shrink import shrink_attention, shrink_mlp
from . import flap
from .base import LayerContext, PruningMethod, Selection
from .registry import method_spec

# Calibration sequences on which the per-block reconstruction error is measured (bounds its memory).
DIAGNOSTIC_SEQUENCES = 8


@dataclass
class AttentionUnits:
    """How heads are removed on a (possibly GQA) model: whole KV groups, or the same query slot in every group."""

    scheme: str  # "kv_group" or "query_slot"
    n_heads: int
    n_kv: int
    head_dim: int
    hidden: int

    @property
    def per_kv(self) -> int:
        return self.n_heads // self.n_kv

    @property
    def count(self) -> int:
        return self.n_kv if self.scheme == "kv_group" else self.per_kv

    @property
    def params(self) -> int:
        """Parameters one unit removes (q, k, v rows and o columns; biases ignored)."""
        if self.scheme == "kv_group":  # g query heads + their K and V head
            return (2 * self.per_kv + 2) * self.head_dim * self.hidden
        return 2 * self.n_kv * self.head_dim * self.hidden  # one query head per group: q rows + o columns

    def scores(self, head_scores: torch.Tensor) -> torch.Tensor:
        if self.scheme == "kv_group":
            return flap.group_scores(head_scores, self.n_kv)
        return flap.slot_scores(head_scores, self.n_kv)

    def unit_heads(self) -> torch.Tensor:
        """[count, heads per unit]: the query heads each unit removes (query head h reads KV head h // g)."""
        g = self.per_kv
        if self.scheme == "kv_group":
            return torch.arange(self.n_kv)[:, None] * g + torch.arange(g)[None, :]
        return torch.arange(g)[:, None] + torch.arange(self.n_kv)[None, :] * g

    def unit_columns(self) -> torch.Tensor:
        """[count, width]: the o_proj input columns of each unit (head h owns columns h*head_dim...)."""
        heads = self.unit_heads()
        cols = heads[:, :, None] * self.head_dim + torch.arange(self.head_dim)
        return cols.reshape(heads.shape[0], -1)

    def keep_indices(self, keep_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept KV heads, kept query slots) for shrink_attention."""
        if self.scheme == "kv_group":
            return keep_units, torch.arange(self.per_kv)
        return torch.arange(self.n_kv), keep_units


@dataclass
class PruneOptions:
    """Method settings beyond (method, sparsity, gqa): the FANG and OBC knobs of `PruneParams`."""

    tau: float = 9.0  # FANG softmax temperature of Eq. 6
    damp: float = 0.01  # OBC Hessian dampening, fraction of its mean diagonal
    shared_group: bool = True  # FANG: never prune the shared neuron group
    function_aware: bool = True  # FANG: prune per functional group with reweighted statistics
    reweighting: str = "ours"  # FANG token-cluster weights (cluster.RELEVANCE_MODES)
    # per-block sparsity (from `prune.allocation`: uniform, fc or taylor, e.g. "OBC + ASA", Table 9);
    # None = `sparsity` in every block, or for FANG its own FangInputs.sparsity
    block_sparsity: Sequence[float] | None = None
    allocation: str = "auto"  # how keep counts per block are chosen (ALLOCATIONS); "flap_search" = FLAP's AL-AM
    compensation: str = "group"  # O-FANG: refit removed neurons per group (Eq. 7) or from the whole layer's kept columns

    @classmethod
    def from_params(cls, p, block_sparsity: Sequence[float] | None = None) -> "PruneOptions":
        """From a `fang.core.params.PruneParams`."""
        return cls(p.tau, p.damp, p.shared_group, p.function_aware, p.reweighting, block_sparsity,
                   p.allocation, p.compensation)

    def validate(self) -> None:
        number = isinstance(self.tau, (int, float)) and not isinstance(self.tau, bool)
        require(
            number and math.isfinite(self.tau) and self.tau > 0,
            f"prune.tau={self.tau} must be positive (softmax temperature of Eq. 6)",
        )
        require(
            isinstance(self.damp, (int, float)) and math.isfinite(self.damp) and self.damp >= 0,
            f"prune.damp={self.damp} must be >= 0",
        )
        require(
            self.reweighting in RELEVANCE_MODES,
            f"prune.reweighting={self.reweighting!r}: use one of {', '.join(RELEVANCE_MODES)}",
        )
        require(
            self.allocation in ALLOCATIONS,
            f"prune.allocation={self.allocation!r}: use one of {', '.join(ALLOCATIONS)}",
        )
        require(
            self.compensation in COMPENSATIONS,
            f"prune.compensation={self.compensation!r}: use one of {', '.join(COMPENSATIONS)}",
        )

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["block_sparsity"] is not None:
            d["block_sparsity"] = [float(s) for s in d["block_sparsity"]]
        return d


@dataclass
class PruneReport:
    method: str
    target_sparsity: float
    dense_block_params: int = 0
    pruned_block_params: int = 0
    layers: list[dict] = field(default_factory=list)
    options: dict = field(default_factory=dict)

    @property
    def achieved_sparsity(self) -> float:
        return 1.0 - self.pruned_block_params / max(self.dense_block_params, 1)

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "target_sparsity": self.target_sparsity,
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


def attention_units(config, scheme: str) -> AttentionUnits:
    require(scheme in ("kv_group", "query_slot"), f"prune.gqa={scheme!r}: use 'kv_group' or 'query_slot'")
    n_heads, n_kv, head_dim = attention_geometry(config)
    if n_kv == n_heads:
        scheme = "kv_group"  # MHA: a "slot" would be all heads at once; both schemes mean plain head pruning
    return AttentionUnits(scheme, n_heads, n_kv, head_dim, config.hidden_size)


def flap_plan_from_capture(
    model: nn.Module, capture, sparsity: float, units: AttentionUnits
) -> tuple[list[int], list[int]]:
    """FLAP's global adaptive structure search on the dense model's captured input statistics."""
    layers = decoder_layers(model)
    columns = units.unit_columns()
    attn_scores, mlp_scores = [], []
    for li in range(len(layers)):
        o_var = torch.from_numpy(capture["o_proj_in_var"][li])
        d_var = torch.from_numpy(capture["down_in_var"][li])
        with block_on_device(model, li) as layer:  # a streamed model's blocks are read one at a time
            w_o = layer.self_attn.o_proj.weight.detach().double().cpu()
            w_d = layer.mlp.down_proj.weight.detach().double().cpu()
        attn, mlp = flap.al_am_scores(
            flap.fluctuation_metric(w_o, o_var), flap.fluctuation_metric(w_d, d_var), columns
        )
        attn_scores.append(attn)
        mlp_scores.append(mlp)
    neuron_params = 3 * units.hidden
    return flap.structure_search(attn_scores, mlp_scores, sparsity, units.params, neuron_params)


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
    """The implementation of a registered method (imported by name: see `fang.methods.registry`)."""
    spec = method_spec(name)
    return getattr(importlib.import_module(f"{__package__}.{spec.module}"), spec.cls)


@torch.no_grad()
def prune_sequential(
    model: nn.Module,
    start_hidden: torch.Tensor | None,
    method: PruningMethod,
    keep_attn: list[int],
    keep_mlp: list[int],
    units: AttentionUnits,
    batch_size: int,
    device: torch.device,
) -> list[dict]:
    """Prune every block in order with `method`, keeping `keep_attn[l]` attention units and `keep_mlp[l]` neurons."""
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
            out_layers.append(entry)
            bar.advance(task)
    return out_layers


def _block_sparsity(values, n_layers: int, name: str) -> list[float]:
    values = [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    require(len(values) == n_layers, f"{name} has {len(values)} entries for {n_layers} layers")
    require(all(0.0 <= v < 1.0 for v in values), f"{name} values must be in [0, 1), got {values}")
    return values


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
) -> PruneReport:
    """Prune `model` in place with `method` to `sparsity` of its decoder-block parameters.

    `capture` is the dense capture store (`fang.analysis.capture.open_capture`): its token ids start the
    sequential pass (block 0's input recomputed in float32) and FLAP's structure search reads its
    statistics. `inputs` is what the method's `load_inputs` reads from its analysis artifacts
    (f_fang / o_fang: `FangInputs`, the cluster, grouping and allocation artifacts, whose per-block
    sparsity replaces `sparsity`, which is then only the reported target).
    """
    method_spec(method)  # FangError naming the registered methods if unknown
    options = options or PruneOptions()
    options.validate()
    require(
        isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) < 1.0,
        f"prune.sparsity={sparsity} is out of range: it must be in [0, 1)",
    )
    require(batch_size > 0, f"prune.batch_size={batch_size} must be positive")
    layers = decoder_layers(model)
    n_layers = len(layers)
    n_ffns = [layer.mlp.down_proj.in_features for layer in layers]
    pruning = method_class(method)(method, options, inputs)
    pruning.check(model)
    device = torch.device(device)
    place_model(model, device)
    report = PruneReport(method, float(sparsity), dense_block_params=count_block_params(model))
    allocation = resolve_allocation(method, options.allocation)
    report.options = {**options.as_dict(), "allocation": allocation}
    units = attention_units(model.config, gqa_scheme)

    own_plan = pruning.plan(model, float(sparsity), units) if allocation not in ALLOCATIONS else None
    if own_plan is not None:  # the method's own keep counts (e.g. ica_fn's global threshold)
        keep_attn, keep_mlp = own_plan
    elif allocation == "flap_search":
        keep_attn, keep_mlp = (
            flap_plan_from_capture(model, capture, sparsity, units)
            if sparsity > 0
            else ([units.count] * n_layers, list(n_ffns))
        )
    else:
        own = pruning.block_sparsity()
        if options.block_sparsity is not None:
            per_block = _block_sparsity(options.block_sparsity, n_layers, "PruneOptions.block_sparsity")
        elif own is not None:  # the method's own allocation (FANG's FangInputs.sparsity)
            per_block = _block_sparsity(own, n_layers, f"{method}'s block sparsity")
        else:
            per_block = [float(sparsity)] * n_layers
        block_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        keep_attn, keep_mlp = flap.param_matched_structure(
            [units.count] * n_layers, n_ffns, per_block, units.params, 3 * units.hidden, block_params
        )

    if keep_attn == [units.count] * n_layers and keep_mlp == n_ffns:  # nothing to remove anywhere
        report.pruned_block_params = report.dense_block_params
        return report

    start_hidden = None
    if pruning.needs_data:
        # recomputed from the token ids in the model's precision: the store's copy would be fp16
        token_ids = torch.from_numpy(capture["token_ids"][:].astype("int64"))
        start_hidden = embed_tokens(model, token_ids, batch_size, device)
    report.layers = prune_sequential(model, start_hidden, pruning, keep_attn, keep_mlp, units, batch_size, device)
    report.pruned_block_params = count_block_params(model)
    return report
