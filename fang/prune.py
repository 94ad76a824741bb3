"""The layer-wise pruning driver shared by every method.

Sequential: block l is pruned using statistics of its inputs as produced by the already pruned
blocks 0..l-1, then the pruned block is rerun so its outputs feed block l+1's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import flap
from .errors import FangError
from .layerwise import BlockRunner, batch_slices, input_hooks
from .modeling import attention_geometry, count_block_params, decoder_layers
from .progress import progress
from .shrink import shrink_attention, shrink_mlp

METHODS = ("flap",)


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

    def keep_indices(self, keep_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept KV heads, kept query slots) for shrink_attention."""
        if self.scheme == "kv_group":
            return keep_units, torch.arange(self.per_kv)
        return torch.arange(self.n_kv), keep_units


@dataclass
class PruneReport:
    method: str
    target_sparsity: float
    dense_block_params: int = 0
    pruned_block_params: int = 0
    layers: list[dict] = field(default_factory=list)

    @property
    def achieved_sparsity(self) -> float:
        return 1.0 - self.pruned_block_params / max(self.dense_block_params, 1)

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "target_sparsity": self.target_sparsity,
            "achieved_sparsity": round(self.achieved_sparsity, 6),
            "dense_block_params": self.dense_block_params,
            "pruned_block_params": self.pruned_block_params,
            "layers": self.layers,
        }


def attention_units(config, scheme: str) -> AttentionUnits:
    n_heads, n_kv, head_dim = attention_geometry(config)
    return AttentionUnits(scheme, n_heads, n_kv, head_dim, config.hidden_size)


def flap_plan_from_capture(model: nn.Module, capture, sparsity: float, units: AttentionUnits) -> tuple[list[int], list[int]]:
    """FLAP's global adaptive structure search on the dense model's captured input statistics."""
    layers = decoder_layers(model)
    attn_scores, mlp_scores = [], []
    for li, layer in enumerate(layers):
        o_var = torch.from_numpy(capture["o_proj_in_var"][li])
        d_var = torch.from_numpy(capture["down_in_var"][li])
        w_o = layer.self_attn.o_proj.weight.detach().double().cpu()
        w_d = layer.mlp.down_proj.weight.detach().double().cpu()
        heads = flap.head_scores(flap.fluctuation_metric(w_o, o_var), units.head_dim)
        attn_scores.append(units.scores(heads))
        mlp_scores.append(flap.fluctuation_metric(w_d, d_var))
    neuron_params = 3 * units.hidden
    return flap.structure_search(attn_scores, mlp_scores, sparsity, units.params, neuron_params)


@torch.no_grad()
def prune_flap_sequential(
    model: nn.Module,
    start_hidden: torch.Tensor,
    keep_attn: list[int],
    keep_mlp: list[int],
    units: AttentionUnits,
    batch_size: int,
    device: torch.device,
) -> list[dict]:
    """Prune each block with FLAP: WIFV metric on current inputs, keep the top units, bias-compensate, shrink."""
    layers = decoder_layers(model)
    runner = BlockRunner(model, device)
    hidden = start_hidden.float().cpu()
    n_seq = hidden.shape[0]
    out_layers = []
    with progress() as bar:
        task = bar.add_task("prune flap", total=len(layers))
        for li, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            o_stats = flap.InputStats()
            d_stats = flap.InputStats()
            sinks = {"o": o_stats, "d": d_stats}
            with input_hooks({"o": attn.o_proj, "d": mlp.down_proj}, lambda n, x: sinks[n].add_batch(x)):
                for sl in batch_slices(n_seq, batch_size):
                    runner(layer, hidden[sl])
            w_o, w_d = attn.o_proj.weight.detach().double(), mlp.down_proj.weight.detach().double()
            heads = flap.head_scores(flap.fluctuation_metric(w_o, o_stats.variance.to(w_o.device)), units.head_dim)
            keep_u = flap.select_top(units.scores(heads), keep_attn[li])
            keep_n = flap.select_top(flap.fluctuation_metric(w_d, d_stats.variance.to(w_d.device)), keep_mlp[li])
            keep_kv, keep_slots = units.keep_indices(keep_u.cpu())
            kept_q = torch.tensor([kv * units.per_kv + s for kv in keep_kv.tolist() for s in keep_slots.tolist()])
            cols = (kept_q[:, None] * units.head_dim + torch.arange(units.head_dim)).reshape(-1)
            o_bias = flap.bias_compensation(w_o, o_stats.mean.to(w_o.device), cols.to(w_o.device))
            d_bias = flap.bias_compensation(w_d, d_stats.mean.to(w_d.device), keep_n.to(w_d.device))
            shrink_attention(attn, keep_kv, keep_slots, o_bias.to(w_o.dtype).float())
            shrink_mlp(mlp, keep_n.cpu(), d_bias.float())
            for sl in batch_slices(n_seq, batch_size):
                hidden[sl] = runner(layer, hidden[sl]).float().cpu()
            out_layers.append({"layer": li, "heads": len(kept_q), "kv_heads": len(keep_kv), "ffn": len(keep_n)})
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
) -> PruneReport:
    """Prune `model` in place with `method` to `sparsity` of its decoder-block parameters."""
    if method not in METHODS:
        raise FangError(f"unknown prune.method {method!r}; available: {', '.join(METHODS)}")
    device = torch.device(device)
    model.to(device).eval()
    report = PruneReport(method, sparsity, dense_block_params=count_block_params(model))
    units = attention_units(model.config, gqa_scheme)
    start_hidden = torch.from_numpy(capture["block_io"][0].astype("float32"))
    n_samples, seq_len = capture.attrs["n_samples"], capture.attrs["seq_len"]
    start_hidden = start_hidden.view(n_samples, seq_len, -1)
    if sparsity == 0.0:
        report.pruned_block_params = report.dense_block_params
        return report
    keep_attn, keep_mlp = flap_plan_from_capture(model, capture, sparsity, units)
    report.layers = prune_flap_sequential(model, start_hidden, keep_attn, keep_mlp, units, batch_size, device)
    report.pruned_block_params = count_block_params(model)
    return report
