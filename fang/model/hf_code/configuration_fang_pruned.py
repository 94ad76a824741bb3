"""Configuration of a structurally pruned Llama-style model (written by fang; needs only transformers).

The config is the dense model's, plus `pruned_layers`: one entry per decoder block giving the
query heads, key/value heads and FFN neurons it kept, and whether its o_proj / down_proj gained a
bias (pruning methods with bias compensation, e.g. FLAP, add one).
"""

from transformers import LlamaConfig

PRUNED_LAYER_KEYS = ("n_heads", "n_kv_heads", "intermediate_size", "o_bias", "down_bias")


class FangPrunedLlamaConfig(LlamaConfig):
    # model_type stays the base one, so tools that only read config.json still see the family

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        layers = getattr(self, "pruned_layers", None)
        if layers is None:  # a bare config (transformers builds one to diff against): the dense model
            return
        if not isinstance(layers, list) or len(layers) != self.num_hidden_layers:
            raise ValueError(
                f"pruned_layers must list {self.num_hidden_layers} blocks, got "
                f"{len(layers) if isinstance(layers, list) else type(layers).__name__}"
            )
        for i, spec in enumerate(layers):
            missing = [k for k in PRUNED_LAYER_KEYS if k not in spec]
            if missing:
                raise ValueError(f"pruned_layers[{i}] lacks {', '.join(missing)}")
            if spec["n_kv_heads"] < 1 or spec["n_heads"] % spec["n_kv_heads"] or spec["intermediate_size"] < 1:
                raise ValueError(f"pruned_layers[{i}] has an impossible shape: {spec}")


__all__ = ["FangPrunedLlamaConfig"]
