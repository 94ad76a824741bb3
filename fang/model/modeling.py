"""Loading causal LMs and reaching into their decoder blocks.

Supported: LLaMA-style decoders (LLaMA 1/2/3, SmolLM2, Qwen2/2.5, Mistral) whose blocks have
`self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..core.errors import FangError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3")
DTYPE_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise FangError(f"unsupported model {type(model).__name__}: expected model.model.layers (a LLaMA-style decoder)")
    return layers


def check_supported(config) -> None:
    """Reject a non-LLaMA-style config (a transformers config or config.json as a dict)."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise FangError(
            f"unsupported model type {model_type!r}: fang prunes LLaMA-style decoders ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    hidden, n_heads, n_kv = get("hidden_size"), get("num_attention_heads"), get("num_key_value_heads")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"):
        value = get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise FangError(f"the model's config.json has {key}={value!r}: it must be a positive integer")
    if not get("head_dim") and hidden % n_heads:
        raise FangError(f"the model's config.json has hidden_size={hidden}, not a multiple of num_attention_heads="
                        f"{n_heads} (and no head_dim): was it edited?")
    if n_kv and (not isinstance(n_kv, int) or n_kv <= 0 or n_heads % n_kv):
        raise FangError(f"the model's config.json has num_key_value_heads={n_kv!r}, which does not divide "
                        f"num_attention_heads={n_heads}")


def attention_geometry(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of the dense config."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv, head_dim


def load_dense(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: str = "float32"):
    """Load a dense HF checkpoint directory (as written by `fetch_model`) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..core.integrity import check_dense_weights, check_safetensors_dir, read_config

    path = Path(path)
    # config.json and the file headers first: a wrong model or a cut file fails before GBs are read
    config = read_config(path)
    check_supported(config)
    check_dense_weights(path, config, check_safetensors_dir(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE_BY_NAME[dtype])
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise FangError(f"could not load the model at {path}: {str(exc).strip().splitlines()[0][:300]}") from None
    check_supported(model.config)
    model.to(device).eval()
    return model, tokenizer


def count_block_params(model: nn.Module) -> int:
    """Parameters inside decoder blocks: what structured pruning removes (embeddings and head excluded)."""
    return sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters())


def tied_names(model: nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters reachable under several names (e.g. lm_head tied to embeddings).

    Decided from object identity, not from the config, so what is saved or streamed matches the model
    in memory.
    """
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


# tokenizer_config.json keys that say how a tokenizer was loaded, not what it is: transformers records
# local_files_only, which HF_HUB_OFFLINE sets, so without this the same tokenizer was saved with different
# bytes (and DVC hashes) depending on the environment of the run
LOAD_TIME_TOKENIZER_KEYS = ("local_files_only",)


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """`tokenizer.save_pretrained(folder)`, minus the load-time keys (`LOAD_TIME_TOKENIZER_KEYS`)."""
    import json

    tokenizer.save_pretrained(folder)
    config = Path(folder) / "tokenizer_config.json"
    if not config.is_file():
        return
    data = json.loads(config.read_text())
    if any(k in data for k in LOAD_TIME_TOKENIZER_KEYS):
        for k in LOAD_TIME_TOKENIZER_KEYS:
            data.pop(k, None)
        config.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
