"""A structurally pruned Llama-style causal LM whose blocks each keep their own number of heads and neurons.

Written by fang next to the weights so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads the checkpoint with
stock transformers. The dense architecture is built first, then each block's projections are
replaced by Linear layers of the kept sizes before the weights are loaded.

Why this is enough: transformers' attention reshapes q/k/v with `view(..., -1, head_dim)`, so head
counts follow the Linear shapes, and it repeats K/V by `num_key_value_groups`, the only head-count
attribute the module keeps, which is set per block here.
"""

from torch import nn
from transformers import LlamaForCausalLM

from .configuration_fang_pruned import FangPrunedLlamaConfig

_QUERY_HEAD_ATTRS = ("num_heads", "num_attention_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads")


def _linear(in_features: int, out_features: int, bias: bool, like: nn.Linear) -> nn.Linear:
    # same device/dtype as the dense layer: meta while transformers builds the empty model
    return nn.Linear(in_features, out_features, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def reshape_block(layer: nn.Module, spec: dict) -> None:
    """Give one dense decoder block the kept sizes in `spec` (q/k/v and gate/up bias flags stay dense)."""
    attn, mlp = layer.self_attn, layer.mlp
    n_heads, n_kv, inter = int(spec["n_heads"]), int(spec["n_kv_heads"]), int(spec["intermediate_size"])
    head_dim, hidden = attn.head_dim, attn.q_proj.in_features
    attn.q_proj = _linear(hidden, n_heads * head_dim, attn.q_proj.bias is not None, attn.q_proj)
    attn.k_proj = _linear(hidden, n_kv * head_dim, attn.k_proj.bias is not None, attn.k_proj)
    attn.v_proj = _linear(hidden, n_kv * head_dim, attn.v_proj.bias is not None, attn.v_proj)
    attn.o_proj = _linear(n_heads * head_dim, hidden, bool(spec["o_bias"]), attn.o_proj)
    attn.num_key_value_groups = n_heads // n_kv
    for name in _QUERY_HEAD_ATTRS:
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, n_heads)
    for name in _KV_HEAD_ATTRS:
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, n_kv)
    mlp.gate_proj = _linear(hidden, inter, mlp.gate_proj.bias is not None, mlp.gate_proj)
    mlp.up_proj = _linear(hidden, inter, mlp.up_proj.bias is not None, mlp.up_proj)
    mlp.down_proj = _linear(inter, hidden, bool(spec["down_bias"]), mlp.down_proj)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = inter


class FangPrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = FangPrunedLlamaConfig

    def __init__(self, config: FangPrunedLlamaConfig):
        super().__init__(config)
        for layer, spec in zip(self.model.layers, getattr(config, "pruned_layers", None) or []):
            reshape_block(layer, spec)


__all__ = ["FangPrunedLlamaForCausalLM"]
