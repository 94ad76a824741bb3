"""`fang export --gguf`: a pruned (or dense) checkpoint written as a llama.cpp `deci` GGUF file.

Without llama.cpp: the file reads back with gguf's GGUFReader with the per-layer arrays, tensor
shapes and tokenizer; a NumPy forward pass that follows llama.cpp's deci graph (interleaved RoPE on
the permuted Q/K, per-layer GQA, optional output/FFN biases) reproduces transformers' logits.
With llama-cpp-python importable (not in CI): llama.cpp's own logits and tokenization match.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fang.core.errors import FangError
from fang.model.export_gguf import export_gguf, layer_sizes, llama3_rope_factors, pre_tokenizer_name
from fang.model.modeling import decoder_layers
from fang.model.shrink import load_pruned, save_pruned, shrink_attention, shrink_mlp

gguf = pytest.importorskip("gguf")

VOCAB = 320  # the tokenizer has fewer tokens: the export pads with unused entries, as for real models
TEXT = "The cat sat on the mat. 12345 cats, 67 mats!\nA dog ran to the park and the cat ran after it.\n"
# llama.cpp's logits vs transformers' float32 ones (|logits| up to ~5 here): an f32 file with an f32 KV cache
# differs only by summation order (4e-6 seen); f16 weights with llama.cpp's default f16 KV cache, 5e-3 seen
RUNTIME_ATOL = {"f32": 1e-4, "f16": 2e-2}


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (like SmolLM2's), trained in code on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")


def tiny_llama(tied: bool = True, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=tied, rope_theta=10000.0, **overrides)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return model


def prune_unevenly(model) -> None:
    """Every block its own query/KV head count and FFN width; FLAP-style biases on some blocks."""
    gen = torch.Generator().manual_seed(3)
    hidden = model.config.hidden_size
    layers = decoder_layers(model)
    # block 0 stays dense; 1 drops a KV group (2 q / 1 kv); 2 drops a query slot (2 q / 2 kv); 3 keeps 1 q / 1 kv
    shrink_attention(layers[1].self_attn, [1], [0, 1], extra_o_bias=torch.randn(hidden, generator=gen))
    shrink_attention(layers[2].self_attn, [0, 1], [1])
    shrink_attention(layers[3].self_attn, [0], [1], extra_o_bias=torch.randn(hidden, generator=gen))
    shrink_mlp(layers[1].mlp, list(range(0, 96, 2)))
    shrink_mlp(layers[2].mlp, list(range(37)), extra_down_bias=torch.randn(hidden, generator=gen))
    shrink_mlp(layers[3].mlp, [5])


EXPECTED_SIZES = [(4, 2, 96), (2, 1, 48), (2, 2, 37), (1, 1, 1)]


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    model = tiny_llama()
    prune_unevenly(model)
    out = tmp_path_factory.mktemp("ckpt") / "pruned"
    save_pruned(model, byte_level_tokenizer(), out)
    return out


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "dense"
    model = tiny_llama(tied=False, seed=1)
    model.save_pretrained(out)
    byte_level_tokenizer().save_pretrained(out)
    return out


def reader_fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def reference_logits(path, ids: list[int]) -> np.ndarray:
    """Logits of the GGUF computed as llama.cpp's deci graph does (src/models/deci.cpp), in float64 NumPy."""
    reader = gguf.GGUFReader(path)
    kv = reader_fields(reader)
    t = {tensor.name: np.asarray(tensor.data, dtype=np.float64) for tensor in reader.tensors}
    n_layer = kv["deci.block_count"]
    n_head, n_kv, head_dim = kv["deci.attention.head_count"], kv["deci.attention.head_count_kv"], kv["deci.attention.key_length"]
    eps, theta = kv["deci.attention.layer_norm_rms_epsilon"], kv["deci.rope.freq_base"]

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def linear(x, name):
        y = x @ t[f"{name}.weight"].T
        return y + t[f"{name}.bias"] if f"{name}.bias" in t else y

    pos = np.arange(len(ids))[:, None]
    angles = pos * theta ** (-np.arange(0, head_dim, 2) / head_dim)  # [T, d/2]
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

    def rope(x):  # llama.cpp's "normal" RoPE: rotates dimensions (2j, 2j+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    x = t["token_embd.weight"][ids]
    T = len(ids)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for il in range(n_layer):
        h = rms(x, t[f"blk.{il}.attn_norm.weight"])
        q = rope(linear(h, f"blk.{il}.attn_q").reshape(T, n_head[il], head_dim))
        k = rope(linear(h, f"blk.{il}.attn_k").reshape(T, n_kv[il], head_dim))
        v = linear(h, f"blk.{il}.attn_v").reshape(T, n_kv[il], head_dim)
        group = n_head[il] // n_kv[il]
        heads = []
        for hd in range(n_head[il]):
            scores = q[:, hd] @ k[:, hd // group].T / np.sqrt(head_dim) + mask
            p = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append((p / p.sum(-1, keepdims=True)) @ v[:, hd // group])
        x = x + linear(np.concatenate(heads, -1), f"blk.{il}.attn_output")
        h = rms(x, t[f"blk.{il}.ffn_norm.weight"])
        gate = linear(h, f"blk.{il}.ffn_gate")
        x = x + linear(gate / (1 + np.exp(-gate)) * linear(h, f"blk.{il}.ffn_up"), f"blk.{il}.ffn_down")
    out = t.get("output.weight", t["token_embd.weight"])
    return rms(x, t["output_norm.weight"]) @ out.T


def hf_logits(model_dir, ids: list[int]) -> np.ndarray:
    from fang.model.shrink import load_any

    model, _ = load_any(model_dir)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def test_pruned_gguf_reads_back_with_per_layer_sizes(pruned_dir, tmp_path):
    info = export_gguf(pruned_dir, tmp_path / "p.gguf", dtype="f32")
    assert [(s["n_heads"], s["n_kv_heads"], s["intermediate_size"]) for s in info["layers"]] == EXPECTED_SIZES
    reader = gguf.GGUFReader(tmp_path / "p.gguf")
    kv = reader_fields(reader)
    assert kv["general.architecture"] == "deci"
    assert kv["deci.attention.head_count"] == [4, 2, 2, 1]
    assert kv["deci.attention.head_count_kv"] == [2, 1, 2, 1]
    assert kv["deci.feed_forward_length"] == [96, 48, 37, 1]
    assert kv["deci.block_count"] == 4 and kv["deci.embedding_length"] == 64
    assert kv["deci.attention.key_length"] == kv["deci.attention.value_length"] == kv["deci.rope.dimension_count"] == 16
    assert kv["deci.rope.freq_base"] == 10000.0 and kv["deci.vocab_size"] == VOCAB

    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # GGUF order: [in, out]
    for il, (n_head, n_kv, n_ff) in enumerate(EXPECTED_SIZES):
        assert shapes[f"blk.{il}.attn_q.weight"] == (64, n_head * 16)
        assert shapes[f"blk.{il}.attn_k.weight"] == shapes[f"blk.{il}.attn_v.weight"] == (64, n_kv * 16)
        assert shapes[f"blk.{il}.attn_output.weight"] == (n_head * 16, 64)
        assert shapes[f"blk.{il}.ffn_gate.weight"] == shapes[f"blk.{il}.ffn_up.weight"] == (64, n_ff)
        assert shapes[f"blk.{il}.ffn_down.weight"] == (n_ff, 64)
    # the compensation biases of blocks 1 and 3 (o_proj) and 2 (down_proj), and no others
    assert sorted(n for n in shapes if n.endswith(".bias")) == [
        "blk.1.attn_output.bias", "blk.2.ffn_down.bias", "blk.3.attn_output.bias"]
    assert "output.weight" not in shapes  # tied: llama.cpp reuses token_embd
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)


def test_tokenizer_keys(pruned_dir, tmp_path):
    export_gguf(pruned_dir, tmp_path / "p.gguf")
    kv = reader_fields(gguf.GGUFReader(tmp_path / "p.gguf"))
    tok = byte_level_tokenizer()
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == VOCAB and len(kv["tokenizer.ggml.token_type"]) == VOCAB
    assert all(tokens[i] == s for s, i in tok.get_vocab().items())
    assert tokens[-1] == f"[PAD{VOCAB - 1}]" and kv["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED
    assert kv["tokenizer.ggml.token_type"][tok.convert_tokens_to_ids("<|im_start|>")] == gguf.TokenType.CONTROL
    spec = json.loads((pruned_dir / "tokenizer.json").read_text())
    assert len(kv["tokenizer.ggml.merges"]) == len(spec["model"]["merges"])
    assert kv["tokenizer.ggml.bos_token_id"] == tok.bos_token_id and kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert kv["tokenizer.ggml.add_bos_token"] is False  # this tokenizer adds no BOS, like SmolLM2's


@pytest.mark.parametrize("dtype,atol", [("f32", 1e-4), ("f16", 3e-2)])
def test_deci_forward_matches_transformers(pruned_dir, tmp_path, dtype, atol):
    """Q/K permutation, per-layer GQA and biases: the GGUF computes the checkpoint's logits."""
    export_gguf(pruned_dir, tmp_path / "p.gguf", dtype=dtype)
    ids = byte_level_tokenizer()(TEXT)["input_ids"][:24]
    expected = hf_logits(pruned_dir, ids)
    got = reference_logits(tmp_path / "p.gguf", ids)
    assert np.abs(got - expected).max() < atol
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_dense_untied_export(dense_dir, tmp_path):
    info = export_gguf(dense_dir, tmp_path / "d.gguf", dtype="f16")
    reader = gguf.GGUFReader(tmp_path / "d.gguf")
    kv = reader_fields(reader)
    assert kv["deci.attention.head_count"] == [4] * 4 and kv["deci.feed_forward_length"] == [96] * 4
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["output.weight"] == types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert info["parameters"] == sum(p.numel() for p in LlamaForCausalLM.from_pretrained(dense_dir).parameters())
    ids = byte_level_tokenizer()(TEXT)["input_ids"][:16]
    assert np.abs(reference_logits(tmp_path / "d.gguf", ids) - hf_logits(dense_dir, ids)).max() < 3e-2


def test_llama3_rope_factors_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=16, head_dim=128, max_position_embeddings=131072,
                         rope_parameters=params)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    # llama.cpp divides each frequency by its factor
    np.testing.assert_allclose(llama3_rope_factors(500000.0, 128, params), (base / scaled.double()).numpy(), rtol=1e-5)


def test_llama3_export_writes_rope_freqs(tmp_path):
    params = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = tiny_llama(rope_parameters=params)
    model.save_pretrained(tmp_path / "m")
    byte_level_tokenizer().save_pretrained(tmp_path / "m")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    freqs = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}["rope_freqs.weight"]
    np.testing.assert_allclose(np.asarray(freqs.data), llama3_rope_factors(10000.0, 16, params))


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"
    from fang.model.export_gguf import LLAMA3_SPLIT_REGEX

    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
        {**byte_level, "use_regex": False}]}
    assert pre_tokenizer_name({"pre_tokenizer": llama3}) == "llama-bpe"
    with pytest.raises(FangError, match="--tokenizer-pre"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})


def test_tokenizer_pre_override(pruned_dir, tmp_path):
    info = export_gguf(pruned_dir, tmp_path / "p.gguf", tokenizer_pre="smollm")
    assert info["tokenizer_pre"] == "smollm"
    assert reader_fields(gguf.GGUFReader(tmp_path / "p.gguf"))["tokenizer.ggml.pre"] == "smollm"


def test_layer_without_heads_or_neurons_is_refused():
    config = {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "num_hidden_layers": 1}

    def block(q_rows=64, kv_rows=32, n_ff=96):
        z = np.zeros
        return {"model.layers.0.self_attn.q_proj.weight": z((q_rows, 64)), "model.layers.0.self_attn.k_proj.weight": z((kv_rows, 64)),
                "model.layers.0.self_attn.v_proj.weight": z((kv_rows, 64)), "model.layers.0.self_attn.o_proj.weight": z((64, q_rows)),
                "model.layers.0.mlp.gate_proj.weight": z((n_ff, 64)), "model.layers.0.mlp.up_proj.weight": z((n_ff, 64)),
                "model.layers.0.mlp.down_proj.weight": z((64, n_ff))}

    assert layer_sizes(config, block()) == [{"n_heads": 4, "n_kv_heads": 2, "intermediate_size": 96}]
    with pytest.raises(FangError, match="block 0 has no attention heads"):
        layer_sizes(config, block(q_rows=0, kv_rows=0))
    with pytest.raises(FangError, match="block 0 has no FFN neurons"):
        layer_sizes(config, block(n_ff=0))
    with pytest.raises(FangError, match="inconsistent attention shapes"):
        layer_sizes(config, block(q_rows=48, kv_rows=32))  # 3 query heads cannot share 2 KV heads


def test_structure_mismatch_is_refused(pruned_dir, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(pruned_dir, ckpt)
    structure = json.loads((ckpt / "structure.json").read_text())
    structure["layers"][2]["intermediate_size"] = 36
    (ckpt / "structure.json").write_text(json.dumps(structure))
    with pytest.raises(FangError, match="block 2: structure.json says"):
        export_gguf(ckpt, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_unsupported_architectures_are_refused(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path / "qwen3")
    with pytest.raises(FangError, match="supports model types llama.*'qwen3'"):
        export_gguf(tmp_path / "qwen3", tmp_path / "q.gguf")
    model = tiny_llama(hidden_act="gelu")
    model.save_pretrained(tmp_path / "gelu")
    with pytest.raises(FangError, match="silu"):
        export_gguf(tmp_path / "gelu", tmp_path / "g.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_non_byte_level_tokenizer_is_refused(tmp_path):
    from helpers_tokenizer import tiny_tokenizer

    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")  # a character-level WordLevel tokenizer
    with pytest.raises(FangError, match="byte-level BPE"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf")


def test_cli(pruned_dir, tmp_path, capsys):
    from fang.cli import main

    main(["export", "--gguf", str(tmp_path / "cli.gguf"), "--model", str(pruned_dir), "--dtype", "f32"])
    assert "deci" in capsys.readouterr().err
    assert reader_fields(gguf.GGUFReader(tmp_path / "cli.gguf"))["deci.feed_forward_length"] == [96, 48, 37, 1]
    with pytest.raises(SystemExit) as exc:
        main(["export", "--gguf", str(tmp_path / "bad.gguf"), "--model", str(pruned_dir), "--dtype", "q3"])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------------------------------------------------
# with llama.cpp itself (llama-cpp-python); skipped where it is not installed, as in CI


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_logits_match_transformers(pruned_dir, tmp_path, dtype):
    llama_cpp = pytest.importorskip("llama_cpp")
    export_gguf(pruned_dir, tmp_path / "p.gguf", dtype=dtype)
    tok = byte_level_tokenizer()
    kv_type = {"f32": 0, "f16": None}[dtype]  # GGML_TYPE_F32 = 0; None keeps llama.cpp's default (f16)
    llm = llama_cpp.Llama(str(tmp_path / "p.gguf"), n_ctx=128, n_batch=128, n_threads=1, logits_all=True, verbose=False,
                          type_k=kv_type, type_v=kv_type)
    try:
        text = TEXT.encode()
        assert llm.tokenize(text, add_bos=True, special=False) == tok(TEXT)["input_ids"]
        ids = tok(TEXT)["input_ids"][:32]
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()
    expected = hf_logits(pruned_dir, ids)
    assert np.abs(got - expected).max() < RUNTIME_ATOL[dtype]
    assert (got.argmax(-1) == expected.argmax(-1)).all()
