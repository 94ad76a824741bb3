"""Writing a fang checkpoint (pruned or dense, LLaMA family) as a GGUF file that llama.cpp runs.

A pruned block keeps its own number of query heads, KV heads and FFN neurons. llama.cpp's `llama`
architecture reads one head count and one FFN width for all blocks, but its `deci` architecture
(written for NVIDIA's NAS-pruned Nemotron models) reads them per block: `deci.attention.head_count`,
`deci.attention.head_count_kv` and `deci.feed_forward_length` may be arrays with one entry per
block. Otherwise `deci` is LLaMA: RMSNorm, RoPE, SwiGLU, optional output / FFN biases (so FLAP's
compensation biases load too), and an output matrix that may be the tied embedding.

The sizes are read from the weights themselves (and checked against `structure.json` and
`config.json`'s `pruned_layers` when present), so a dense checkpoint exports the same way.

Layout conversions, as llama.cpp's own converter does them for LLaMA weights:
- Q and K rows are permuted per head from Hugging Face's rotate-half RoPE layout to llama.cpp's
  interleaved pairs (`_permute_rope`); V, O and the FFN are copied as they are;
- 1-D tensors (norms, biases) stay float32; matrices are float32 or float16 (`dtype`).

Tokenizer: GPT-2-style byte-level BPE from `tokenizer.json` (SmolLM2, Llama 3); the pre-tokenizer
name llama.cpp needs (`tokenizer.ggml.pre`) is read from the tokenizer's own pre-tokenizer
definition, or given with `tokenizer_pre`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..core.errors import FangError, require

SUPPORTED_MODEL_TYPES = ("llama",)
DTYPES = ("f32", "f16")
ARCH = "deci"

# pre-tokenizer regex of Llama 3's tokenizer.json (a `Split` before a regex-free ByteLevel)
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp names of the pre-tokenizers recognised from tokenizer.json (see `pre_tokenizer_name`)
KNOWN_PRE_TOKENIZERS = ("gpt-2", "smollm", "llama-bpe")

# Hugging Face tensor name (inside a block: after "model.layers.N.") -> gguf MODEL_TENSOR member name
_BLOCK_TENSORS = {
    "input_layernorm": "ATTN_NORM",
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "post_attention_layernorm": "FFN_NORM",
    "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
}
_TOP_TENSORS = {"model.embed_tokens": "TOKEN_EMBD", "model.norm": "OUTPUT_NORM", "lm_head": "OUTPUT"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise FangError("GGUF export needs the `gguf` package (a fang dependency): pip install gguf") from None
    return gguf


# ----------------------------------------------------------------------------------------------------------------------
# reading the checkpoint


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise FangError(f"{index} is not a valid safetensors index") from None
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    require(single.exists(), f"{model_dir} has no model.safetensors (nor a model.safetensors.index.json): "
                             "export needs a safetensors checkpoint as fang writes them")
    return [single]


def read_tensors(model_dir: str | os.PathLike) -> dict:
    """{Hugging Face name: float32 numpy array} of every weight in the checkpoint's safetensors files."""
    import torch
    from safetensors import safe_open

    from ..core.integrity import check_safetensors

    tensors = {}
    for path in _weight_files(Path(model_dir)):
        require(path.exists(), f"{path} is missing (listed by the safetensors index)")
        check_safetensors(path)
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                tensors[name] = fh.get_tensor(name).to(torch.float32).numpy()
    return tensors


def head_dim_of(config: dict) -> int:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return int(head_dim)


def layer_sizes(config: dict, tensors: dict) -> list[dict]:
    """Per block: query heads, KV heads and FFN width, read from the weight shapes and validated.

    llama.cpp's `deci` skips a block with zero FFN width (dropping its attention output too) and
    treats zero KV heads as Nemotron's "linear attention"; fang never writes such blocks (at least
    one head and one neuron stay), so a checkpoint that has one is refused rather than misread.
    """
    hidden, head_dim = int(config["hidden_size"]), head_dim_of(config)
    sizes = []
    for i in range(int(config["num_hidden_layers"])):
        prefix = f"model.layers.{i}."

        def shape(name: str) -> tuple:
            key = f"{prefix}{name}.weight"
            require(key in tensors, f"block {i}: weight {key} is missing from the checkpoint")
            return tuple(tensors[key].shape)

        q, k, v, o = shape("self_attn.q_proj"), shape("self_attn.k_proj"), shape("self_attn.v_proj"), shape("self_attn.o_proj")
        gate, up, down = shape("mlp.gate_proj"), shape("mlp.up_proj"), shape("mlp.down_proj")
        n_heads, rem_q = divmod(q[0], head_dim)
        n_kv, rem_kv = divmod(k[0], head_dim)
        n_ff = gate[0]
        require(n_heads > 0 and n_kv > 0, f"block {i} has no attention heads left (q_proj {q}, k_proj {k}): "
                                          "llama.cpp's deci would read it as a different kind of block; fang keeps at least one")
        require(n_ff > 0, f"block {i} has no FFN neurons left (gate_proj {gate}): llama.cpp's deci would skip the "
                          "whole block; fang keeps at least one")
        require(
            rem_q == 0 and rem_kv == 0 and n_heads % n_kv == 0 and v == k and q[1] == k[1] == v[1] == hidden
            and o == (hidden, n_heads * head_dim),
            f"block {i} has inconsistent attention shapes: q_proj {q}, k_proj {k}, v_proj {v}, o_proj {o} "
            f"(head_dim {head_dim}, hidden {hidden})",
        )
        require(up == gate and gate[1] == hidden and down == (hidden, n_ff),
                f"block {i} has inconsistent FFN shapes: gate_proj {gate}, up_proj {up}, down_proj {down}")
        sizes.append({"n_heads": n_heads, "n_kv_heads": n_kv, "intermediate_size": n_ff})
    return sizes


def _check_declared(model_dir: Path, config: dict, sizes: list[dict]) -> None:
    """The sizes read from the weights equal those structure.json / config.json declare (when they do)."""
    declared = {}
    structure = model_dir / "structure.json"
    if structure.exists():
        try:
            declared["structure.json"] = json.loads(structure.read_text())["layers"]
        except (ValueError, KeyError, TypeError):
            raise FangError(f"{structure} is not a valid fang structure file") from None
    if isinstance(config.get("pruned_layers"), list):
        declared["config.json pruned_layers"] = config["pruned_layers"]
    keys = ("n_heads", "n_kv_heads", "intermediate_size")
    for source, layers in declared.items():
        require(len(layers) == len(sizes), f"{source} lists {len(layers)} blocks, the weights have {len(sizes)}")
        for i, (spec, got) in enumerate(zip(layers, sizes)):
            want = {k: spec.get(k) for k in keys}
            require(want == got, f"block {i}: {source} says {want}, the weights say {got}")


# ----------------------------------------------------------------------------------------------------------------------
# conversions


def _permute_rope(weight, head_dim: int):
    """Q/K rows (or bias) per head from rotate-half order [x0..x_{d/2-1}, y0..] to interleaved pairs [x0, y0, x1, y1, ..].

    Hugging Face's LLaMA rotates dimension j with j + d/2; llama.cpp's LLaMA-style RoPE rotates
    2j with 2j+1. Applied to the rows of q_proj/k_proj (and their biases), the model computes the
    same attention scores, since q.k is a sum over dimensions in any order.
    """
    rows = weight.shape[0]
    return (weight.reshape(rows // head_dim, 2, head_dim // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def rope_settings(config: dict) -> tuple[float, str, dict]:
    """(theta, rope type, its parameters) from transformers 5's `rope_parameters` or older `rope_theta`/`rope_scaling`."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        params = {**(config.get("rope_scaling") or {}), "rope_theta": config.get("rope_theta", 10000.0)}
    params = params.get("full_attention", params)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    return float(params.get("rope_theta", 10000.0)), str(rope_type), params


def llama3_rope_factors(theta: float, head_dim: int, params: dict):
    """Per frequency divisor of Llama 3's RoPE scaling (llama.cpp's `rope_freqs` tensor: it divides each frequency)."""
    import numpy as np

    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_len = float(params.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    factors = []
    for j in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (j / head_dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# tokenizer


def _flatten(node) -> list[dict]:
    if not isinstance(node, dict):
        return []
    for key in ("pretokenizers", "processors", "decoders"):
        if node.get("type") == "Sequence" and isinstance(node.get(key), list):
            return [leaf for child in node[key] for leaf in _flatten(child)]
    return [node]


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer a tokenizer.json defines (its regex split before BPE).

    Plain ByteLevel with its regex is GPT-2's; digits split one by one before it is SmolLM's
    (llama.cpp "smollm"); Llama 3 splits with its own regex and a regex-free ByteLevel.
    """
    parts = _flatten(spec.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if (kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True)
            and (parts[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT_REGEX):
        return "llama-bpe"
    raise FangError(
        f"cannot tell llama.cpp's name for this tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}): "
        f"pass --tokenizer-pre with the name llama.cpp uses for it (known here: {', '.join(KNOWN_PRE_TOKENIZERS)})"
    )


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def vocab_tokens(spec: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings by id and their llama.cpp types, padded to the model's vocab_size with unused entries."""
    gguf = _gguf()
    model = spec.get("model") or {}
    require(model.get("type") == "BPE" and isinstance(model.get("vocab"), dict),
            f"tokenizer.json has a {model.get('type')!r} model: GGUF export supports byte-level BPE tokenizers only")
    byte_level = any(p.get("type") == "ByteLevel" for p in _flatten(spec.get("pre_tokenizer")) + _flatten(spec.get("decoder")))
    require(byte_level and not model.get("byte_fallback"),
            "tokenizer.json is BPE but not GPT-2-style byte-level (no ByteLevel pre-tokenizer/decoder, or "
            "SentencePiece-style byte fallback): GGUF export supports byte-level BPE tokenizers only")
    by_id: dict[int, tuple[str, int]] = {int(i): (tok, gguf.TokenType.NORMAL) for tok, i in model["vocab"].items()}
    for added in spec.get("added_tokens") or []:
        content = added["content"]
        special = added.get("special") or _looks_special(content)
        by_id[int(added["id"])] = (content, gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    top = max(by_id, default=-1)
    require(top < vocab_size, f"tokenizer.json has token id {top}, beyond the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        tok, typ = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(tok)
        types.append(int(typ))
    return tokens, types


def bpe_merges(spec: dict) -> list[str]:
    """tokenizer.json's merges as llama.cpp reads them: "left right", a space inside a part written as U+0120.

    tokenizer.json lists them as "left right" strings or (since transformers 4.45) as [left, right]
    pairs, which may hold a literal space; byte-level BPE spells the space byte as U+0120 anyway.
    """
    merges = (spec.get("model") or {}).get("merges")
    require(isinstance(merges, list) and merges, "tokenizer.json has no BPE merges")
    if all(isinstance(m, str) for m in merges):
        return list(merges)
    require(all(isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m) for m in merges),
            "tokenizer.json's merges are neither strings nor pairs of strings")
    return [" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in pair) for pair in merges]


def _adds_bos_eos(model_dir: Path) -> tuple[bool, bool]:
    """Whether the checkpoint's tokenizer puts BOS / EOS around a text (what llama.cpp must then do too)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a", add_special_tokens=True)["input_ids"]
    bos = tok.bos_token_id is not None and len(full) > len(plain) and full[0] == tok.bos_token_id
    eos = tok.eos_token_id is not None and len(full) > len(plain) and full[-1] == tok.eos_token_id
    return bos, eos


def add_tokenizer(writer, model_dir: Path, vocab_size: int, tokenizer_pre: str | None = None) -> str:
    """Write the tokenizer keys (model, pre, tokens, types, merges, special ids, chat template); returns the pre name."""
    gguf = _gguf()
    path = model_dir / "tokenizer.json"
    require(path.exists(), f"{model_dir} has no tokenizer.json: GGUF export needs a fast (tokenizers) tokenizer file")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FangError(f"{path} is not valid JSON ({exc})") from None
    tokens, types = vocab_tokens(spec, vocab_size)
    pre = tokenizer_pre or pre_tokenizer_name(spec)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(bpe_merges(spec))
    # special token ids and the chat template as llama.cpp's converter reads them (tokenizer_config.json, config.json)
    special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=vocab_size)
    bos, eos = _adds_bos_eos(model_dir)
    special.add_special_token = {"bos": bos, "eos": eos}  # what transformers does, not a tokenizer_config guess
    template = model_dir / "chat_template.jinja"  # transformers 5 saves it beside, older gguf versions miss it
    if special.chat_template is None and template.exists():
        special.chat_template = template.read_text(encoding="utf-8")
    special.add_to_gguf(writer, quiet=True)
    return pre


# ----------------------------------------------------------------------------------------------------------------------
# export


def _check_config(config: dict) -> None:
    model_type = config.get("model_type")
    require(model_type in SUPPORTED_MODEL_TYPES,
            f"GGUF export supports model types {', '.join(SUPPORTED_MODEL_TYPES)} (llama.cpp's deci architecture is "
            f"LLaMA's block with per-layer sizes); this checkpoint is {model_type!r}")
    act = config.get("hidden_act", "silu")
    require(act == "silu", f"GGUF export needs a SwiGLU (silu) FFN as llama.cpp's deci runs it; this model uses {act!r}")


def _tensor_plan(config: dict, tensors: dict, sizes: list[dict]) -> list[tuple[str, str, int | None, str]]:
    """[(Hugging Face name, GGUF name, block or None, kind)] for every tensor to write; kind says how to convert it.

    An unknown tensor (a q/k norm, a bias the deci graph would ignore) is an error, never silently dropped.
    """
    gguf = _gguf()
    plan, unknown = [], []
    n_layers = len(sizes)
    for name in tensors:
        base, _, suffix = name.rpartition(".")
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by every runtime
        if suffix not in ("weight", "bias"):
            unknown.append(name)
            continue
        if base in _TOP_TENSORS and suffix == "weight":
            if base == "lm_head" and config.get("tie_word_embeddings") and "model.embed_tokens.weight" in tensors:
                continue  # llama.cpp uses token_embd when the output matrix is absent
            plan.append((name, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[_TOP_TENSORS[base]]] + ".weight", None, "matrix"
                         if base != "model.norm" else "vector"))
            continue
        parts = base.split(".", 3)
        if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _BLOCK_TENSORS:
            bid = int(parts[2])
            if bid >= n_layers:
                unknown.append(name)
                continue
            gguf_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[_BLOCK_TENSORS[parts[3]]]].format(bid=bid) + f".{suffix}"
            if parts[3].endswith("layernorm") and suffix == "bias":
                unknown.append(name)  # RMSNorm has no bias in llama.cpp's deci
                continue
            rope = parts[3] in ("self_attn.q_proj", "self_attn.k_proj")
            kind = ("rope_" if rope else "") + ("matrix" if suffix == "weight" and not parts[3].endswith("layernorm") else "vector")
            plan.append((name, gguf_name, bid, kind))
            continue
        unknown.append(name)
    require(not unknown, f"the checkpoint has tensors llama.cpp's deci architecture has no place for: "
                         f"{', '.join(sorted(unknown)[:6])}{' ...' if len(unknown) > 6 else ''}")
    require("model.embed_tokens.weight" in tensors, "the checkpoint has no model.embed_tokens.weight")
    return plan


def export_gguf(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "f16",
    tokenizer_pre: str | None = None,
) -> dict:
    """Write the checkpoint at `model_dir` (dense or fang-pruned LLaMA) as a `deci` GGUF file at `out`.

    Returns a summary: per-block sizes, tensor count, parameters, file size. The file is written
    beside `out` and renamed over it only when complete.
    """
    import numpy as np

    from ..core.integrity import read_config

    gguf = _gguf()
    require(dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    # written as is into tokenizer.ggml.pre: llama.cpp refuses to load a file whose name it does not know
    require(tokenizer_pre is None or tokenizer_pre in KNOWN_PRE_TOKENIZERS,
            f"--tokenizer-pre {tokenizer_pre!r} is not one of {', '.join(KNOWN_PRE_TOKENIZERS)} (the byte-level BPE "
            "pre-tokenizers this export writes): leave it out to read it from tokenizer.json")
    model_dir, out = Path(model_dir), Path(out)
    require(model_dir.is_dir(), f"no model directory at {model_dir}")
    config = read_config(model_dir)
    _check_config(config)
    tensors = read_tensors(model_dir)
    sizes = layer_sizes(config, tensors)
    _check_declared(model_dir, config, sizes)
    plan = _tensor_plan(config, tensors, sizes)
    head_dim = head_dim_of(config)
    theta, rope_type, rope_params = rope_settings(config)
    require(rope_type in ("default", "linear", "llama3"),
            f"RoPE type {rope_type!r} is not supported by the GGUF export (default, linear, llama3)")
    vocab_size = int(config["vocab_size"])
    require(tensors["model.embed_tokens.weight"].shape == (vocab_size, int(config["hidden_size"])),
            f"model.embed_tokens.weight has shape {tensors['model.embed_tokens.weight'].shape}, "
            f"expected ({vocab_size}, {config['hidden_size']})")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    try:
        writer.add_name(model_dir.resolve().name)
        writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_block_count(len(sizes))
        writer.add_feed_forward_length([s["intermediate_size"] for s in sizes])
        writer.add_head_count([s["n_heads"] for s in sizes])
        writer.add_head_count_kv([s["n_kv_heads"] for s in sizes])
        # llama.cpp would otherwise take the head size from the first block's head count
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        if rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope_params["factor"]))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(vocab_size)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        pre = add_tokenizer(writer, model_dir, vocab_size, tokenizer_pre)

        n_params = 0
        for hf_name, gguf_name, bid, kind in plan:
            data = tensors[hf_name]
            if kind.startswith("rope_"):
                data = _permute_rope(data, head_dim)
            as_f16 = dtype == "f16" and kind.endswith("matrix")
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float16 if as_f16 else np.float32))
            n_params += data.size
        if rope_type == "llama3":
            writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                              llama3_rope_factors(theta, head_dim, rope_params))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {
        "out": str(out),
        "architecture": ARCH,
        "dtype": dtype,
        "tokenizer_pre": pre,
        "tensors": len(plan) + (rope_type == "llama3"),
        "parameters": int(n_params),
        "bytes": out.stat().st_size,
        "layers": sizes,
    }
