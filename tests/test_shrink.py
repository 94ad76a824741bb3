"""Physically shrinking blocks, and the save_pruned / load_pruned round trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import tiny_config, tiny_model
from fang.core.errors import FangError
from fang.model.modeling import attention_geometry, count_block_params, decoder_layers
from fang.model.shrink import (
    STRUCTURE_FILE,
    WEIGHTS_FILE,
    block_structure,
    load_any,
    load_pruned,
    model_structure,
    save_pruned,
    shrink_attention,
    shrink_mlp,
)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _geometry(model):
    n_heads, n_kv, head_dim = attention_geometry(model.config)
    return n_heads, n_kv, n_heads // n_kv, head_dim


def _zeroed_reference(model, removed_q_heads: dict[int, list[int]], removed_neurons: dict[int, list[int]]):
    """The dense model with the outputs of removed heads / neurons zeroed: what shrinking must equal.

    A query head only reaches the output through its o_proj columns and a neuron through its
    down_proj column; K/V heads only feed their own query heads.
    """
    ref = copy.deepcopy(model)
    head_dim = _geometry(model)[3]
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(ref)):
            for h in removed_q_heads.get(i, []):
                layer.self_attn.o_proj.weight[:, h * head_dim : (h + 1) * head_dim] = 0
            for n in removed_neurons.get(i, []):
                layer.mlp.down_proj.weight[:, n] = 0
    return ref


def _prune(model, scheme: str, layer_plan=None, compensate: bool = False, seed: int = 0):
    """Shrink every layer: drop KV group / query slot 0 or 1 (by layer) and every third neuron.

    Returns the removed query heads and neurons per layer (for `_zeroed_reference`).
    """
    n_heads, n_kv, g, _ = _geometry(model)
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    removed_q, removed_n = {}, {}
    for i, layer in enumerate(decoder_layers(model)):
        layer_scheme = layer_plan[i] if layer_plan else scheme
        drop = i % 2
        if layer_scheme == "kv_group":
            keep_kv = [k for k in range(n_kv) if k != drop]
            keep_slots = list(range(g))
        else:
            keep_kv = list(range(n_kv))
            keep_slots = [s for s in range(g) if s != drop] if g > 1 else list(range(g))
        if g == 1 and layer_scheme == "query_slot":
            keep_kv = [k for k in range(n_kv) if k != drop]  # MHA: a slot scheme is plain head pruning
        kept_q = {kv * g + s for kv in keep_kv for s in keep_slots}
        removed_q[i] = sorted(set(range(n_heads)) - kept_q)
        inter = layer.mlp.gate_proj.out_features
        keep_n = [n for n in range(inter) if n % 3 != i]
        removed_n[i] = sorted(set(range(inter)) - set(keep_n))
        extra_o = torch.randn(hidden, generator=gen) if compensate else None
        extra_d = torch.randn(hidden, generator=gen) if compensate else None
        shrink_attention(layer.self_attn, torch.tensor(keep_kv), torch.tensor(keep_slots), extra_o_bias=extra_o)
        shrink_mlp(layer.mlp, torch.tensor(keep_n), extra_down_bias=extra_d)
    return removed_q, removed_n


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2 has q/k/v biases (and none on o_proj): the slicing must carry them along."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # biases too, so a wrongly sliced bias shows
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


# ----------------------------------------------------------------------------------------------------------------------
# shrinking


def test_keep_everything_is_identity(model, input_ids):
    before = _logits(model, input_ids)
    n_heads, n_kv, g, _ = _geometry(model)
    for layer in decoder_layers(model):
        shrink_attention(layer.self_attn, torch.arange(n_kv), torch.arange(g))
        shrink_mlp(layer.mlp, torch.arange(layer.mlp.gate_proj.out_features))
    assert torch.equal(_logits(model, input_ids), before)
    assert model_structure(model)[0] == {
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "intermediate_size": 64,
        "o_bias": False,
        "down_bias": False,
    }


def test_shrink_mlp_shapes_and_equivalence():
    model = tiny_model(4, 4)
    mlp = decoder_layers(model)[0].mlp
    reference = copy.deepcopy(mlp)
    keep = torch.tensor([0, 5, 9, 33, 63])
    removed = sorted(set(range(64)) - set(keep.tolist()))
    extra = torch.randn(48)
    with torch.no_grad():
        reference.down_proj.weight[:, removed] = 0
    shrink_mlp(mlp, keep, extra_down_bias=extra)
    assert mlp.gate_proj.weight.shape == (5, 48) and mlp.up_proj.weight.shape == (5, 48)
    assert mlp.down_proj.weight.shape == (48, 5)
    assert mlp.down_proj.bias is not None and torch.equal(mlp.down_proj.bias, extra)
    assert mlp.intermediate_size == 5
    x = torch.randn(3, 7, 48)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), reference(x) + extra, rtol=1e-5, atol=1e-5)


def test_extra_bias_adds_to_existing_bias():
    model = tiny_model(4, 4)
    mlp = decoder_layers(model)[0].mlp
    first, second = torch.randn(48), torch.randn(48)
    shrink_mlp(mlp, torch.arange(40), extra_down_bias=first)
    shrink_mlp(mlp, torch.arange(20), extra_down_bias=second)
    torch.testing.assert_close(mlp.down_proj.bias, first + second)


@pytest.mark.parametrize("scheme", ["kv_group", "query_slot"])
def test_shrink_attention_matches_zeroed_heads(model, input_ids, scheme):
    n_heads, n_kv, g, head_dim = _geometry(model)
    dense = copy.deepcopy(model)
    removed_q, removed_n = _prune(model, scheme)
    reference = _zeroed_reference(dense, removed_q, removed_n)
    logits = _logits(model, input_ids)
    assert logits.shape == (4, 16, 128)
    torch.testing.assert_close(logits, _logits(reference, input_ids), rtol=1e-4, atol=1e-4)

    attn = decoder_layers(model)[0].self_attn
    if scheme == "kv_group" or g == 1:
        exp_heads, exp_kv = n_heads - g, n_kv - 1
    else:
        exp_heads, exp_kv = n_heads - n_kv, n_kv
    assert attn.q_proj.weight.shape == (exp_heads * head_dim, 48)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (exp_kv * head_dim, 48)
    assert attn.o_proj.weight.shape == (48, exp_heads * head_dim)
    assert attn.num_key_value_groups == exp_heads // exp_kv
    assert block_structure(decoder_layers(model)[0])["n_heads"] == exp_heads


def test_gqa_schemes_shapes():
    model = tiny_model(6, 3)  # head_dim 8, 2 query heads per KV head
    ids = torch.randint(0, 128, (2, 9))
    layers = decoder_layers(model)
    # layer 0: drop KV group 1 with its two queries; layer 1: drop query slot 0 of every group
    shrink_attention(layers[0].self_attn, torch.tensor([0, 2]), torch.arange(2))
    shrink_attention(layers[1].self_attn, torch.arange(3), torch.tensor([1]))
    assert model_structure(model)[0]["n_heads"] == 4 and model_structure(model)[0]["n_kv_heads"] == 2
    assert model_structure(model)[1]["n_heads"] == 3 and model_structure(model)[1]["n_kv_heads"] == 3
    assert layers[0].self_attn.num_key_value_groups == 2
    assert layers[1].self_attn.num_key_value_groups == 1
    assert _logits(model, ids).shape == (2, 9, 128)


@pytest.mark.parametrize("scheme", ["kv_group", "query_slot"])
def test_qwen2_biases_sliced(scheme):
    model = tiny_qwen2()
    ids = torch.randint(0, 128, (2, 11))
    dense = copy.deepcopy(model)
    removed_q, removed_n = _prune(model, scheme)
    attn = decoder_layers(model)[0].self_attn
    assert attn.q_proj.bias.shape[0] == attn.q_proj.weight.shape[0]
    assert attn.k_proj.bias.shape[0] == attn.k_proj.weight.shape[0]
    assert attn.o_proj.bias is None  # no compensation asked: Qwen2's o_proj stays bias-free
    torch.testing.assert_close(
        _logits(model, ids), _logits(_zeroed_reference(dense, removed_q, removed_n), ids), rtol=1e-4, atol=1e-4
    )


def test_shrink_rejects_bad_keeps():
    attn = decoder_layers(tiny_model(6, 3))[0].self_attn
    with pytest.raises(FangError, match="at least one"):
        shrink_attention(attn, torch.tensor([], dtype=torch.long), torch.arange(2))
    with pytest.raises(FangError, match="at least one"):
        shrink_attention(attn, torch.arange(3), torch.tensor([], dtype=torch.long))
    with pytest.raises(FangError, match="out of range"):
        shrink_attention(attn, torch.tensor([0, 3]), torch.arange(2))
    with pytest.raises(FangError, match="duplicates"):
        shrink_attention(attn, torch.tensor([1, 1]), torch.arange(2))
    with pytest.raises(FangError, match="extra bias"):
        shrink_attention(attn, torch.tensor([0]), torch.arange(2), extra_o_bias=torch.zeros(5))
    assert attn.q_proj.weight.shape == (48, 48)  # failed calls changed nothing
    assert attn.k_proj.weight.shape == (24, 48) and attn.num_key_value_groups == 2
    with pytest.raises(FangError, match="at least one"):
        shrink_mlp(decoder_layers(tiny_model())[0].mlp, torch.tensor([], dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------------
# save / load


def test_round_trip_identical_logits(model, input_ids, tmp_path):
    # GQA: mix both schemes across layers, and add compensation biases everywhere
    _prune(model, "kv_group", layer_plan=["kv_group", "query_slot"], compensate=True)
    before = _logits(model, input_ids)
    out = save_pruned(model, None, tmp_path / "pruned")

    structure = json.loads((out / STRUCTURE_FILE).read_text())
    assert structure["format"] == 1
    assert structure["layers"] == model_structure(model)
    assert all(layer["o_bias"] and layer["down_bias"] for layer in structure["layers"])
    assert structure["params"]["block"] == count_block_params(model)
    assert structure["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert not list(tmp_path.glob(".pruned.tmp-*"))  # temp dir renamed into place

    loaded, tokenizer = load_pruned(out)
    assert tokenizer is None
    assert not loaded.training
    assert model_structure(loaded) == model_structure(model)
    for (name, a), (name_b, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name
    for la, lb in zip(decoder_layers(model), decoder_layers(loaded)):
        assert la.self_attn.num_key_value_groups == lb.self_attn.num_key_value_groups
    assert torch.equal(_logits(loaded, input_ids), before)


def test_round_trip_qwen2(tmp_path):
    model = tiny_qwen2()
    ids = torch.randint(0, 128, (2, 11))
    _prune(model, "query_slot", compensate=True)
    before = _logits(model, ids)
    loaded, _ = load_pruned(save_pruned(model, None, tmp_path / "q"))
    assert isinstance(loaded, Qwen2ForCausalLM)
    assert torch.equal(_logits(loaded, ids), before)


def test_round_trip_tied_embeddings_and_tokenizer(tmp_path):
    config = tiny_config(6, 3)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _prune(model, "kv_group", compensate=True)
    ids = torch.randint(0, 128, (2, 10))
    before = _logits(model, ids)
    tokenizer = tiny_tokenizer()

    out = save_pruned(model, tokenizer, tmp_path / "tied")
    with safe_open(str(out / WEIGHTS_FILE), "pt") as fh:
        keys = set(fh.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # stored once

    loaded, loaded_tok = load_pruned(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied after loading
    assert torch.equal(_logits(loaded, ids), before)
    assert loaded_tok("w3 w7 w100")["input_ids"] == tokenizer("w3 w7 w100")["input_ids"]


def test_load_errors(tmp_path):
    with pytest.raises(FangError, match="does not exist"):
        load_pruned(tmp_path / "nowhere")
    (tmp_path / "dense").mkdir()
    with pytest.raises(FangError, match="structure.json is missing"):
        load_pruned(tmp_path / "dense")

    model = tiny_model(4, 4)
    _prune(model, "kv_group")
    out = save_pruned(model, None, tmp_path / "p")
    structure = json.loads((out / STRUCTURE_FILE).read_text())
    structure["layers"][0]["down_bias"] = True  # the file has no such tensor
    (out / STRUCTURE_FILE).write_text(json.dumps(structure))
    with pytest.raises(FangError, match="missing"):
        load_pruned(out)
    structure["layers"][0]["down_bias"] = False
    structure["layers"][0]["intermediate_size"] = 30  # wrong shape: torch refuses the tensor
    (out / STRUCTURE_FILE).write_text(json.dumps(structure))
    with pytest.raises(FangError, match="size mismatch"):
        load_pruned(out)
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(FangError, match="model.safetensors is missing"):
        load_pruned(out)


def test_interrupted_save_leaves_nothing(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    model = tiny_model(4, 4)
    with pytest.raises(OSError):
        save_pruned(model, BrokenTokenizer(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_load_any_casts_pruned_models_to_the_evaluation_dtype(model, input_ids, tmp_path):
    # evaluate.dtype: a pruned checkpoint is stored in float32 and evaluated in bfloat16 by default
    _prune(model, "kv_group", compensate=True)
    out = save_pruned(model, None, tmp_path / "pruned")
    loaded, _ = load_any(out, "cpu", "bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    close = _logits(model, input_ids)
    got = _logits(loaded, input_ids).float()
    # bfloat16 keeps 8 mantissa bits: same logits to a few percent of their spread, not bit-identical
    assert not torch.equal(got, close)
    assert (got - close).abs().max() < 0.1 * close.std()


def test_a_saved_tokenizer_has_the_same_bytes_with_and_without_hf_hub_offline(tmp_path):
    """transformers records the load-time local_files_only (set by HF_HUB_OFFLINE) in tokenizer_config.json;
    fang's saves (fetch_model, save_pruned) leave it out, so a pruned model's DVC hash does not depend on it."""
    import os
    import subprocess
    import sys

    from helpers_tokenizer import tiny_tokenizer as tok

    tok().save_pretrained(tmp_path / "src")
    code = ("import sys\nfrom transformers import AutoTokenizer\nfrom fang.model.modeling import save_tokenizer\n"
            "t = AutoTokenizer.from_pretrained(sys.argv[1])\nt.save_pretrained(sys.argv[2] + '/raw')\n"
            "save_tokenizer(t, sys.argv[2] + '/fang')\n")
    for offline in ("0", "1"):
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_HUB_OFFLINE": offline}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "src"), str(tmp_path / offline)], env=env, check=True)
    raw = [json.loads((tmp_path / o / "raw" / "tokenizer_config.json").read_text()) for o in "01"]
    assert raw[0].get("local_files_only") != raw[1].get("local_files_only")  # the leak this guards against
    saved = [(tmp_path / o / "fang" / "tokenizer_config.json").read_bytes() for o in "01"]
    assert saved[0] == saved[1] and b"local_files_only" not in saved[0]
