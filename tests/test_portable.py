"""A pruned checkpoint loads with stock transformers, in a Python where fang cannot be imported."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import tiny_config
from fang.core.errors import FangError
from fang.model.modeling import decoder_layers
from fang.model.portable import write_portable_code
from fang.model.shrink import load_pruned, save_pruned, shrink_attention, shrink_mlp
from helpers_tokenizer import tiny_tokenizer

# Run with -I -S: no PYTHONPATH, no cwd, and no .pth processing, so the editable install's import
# hook for fang is never installed; site-packages are added back by hand for torch/transformers.
OUTSIDE_FANG = r"""
import importlib.util, json, sys
sys.path.extend(json.loads(sys.argv[2]))
assert importlib.util.find_spec("fang") is None, "fang is importable: the test would prove nothing"
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ckpt = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(ckpt)
ids = torch.tensor(json.loads(open(ckpt + "/../ids.json").read()))
with torch.no_grad():
    logits = model(ids).logits
prompt = tokenizer("the cat", return_tensors="pt")
out = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
save_file({"logits": logits.contiguous(), "generated": out}, ckpt + "/../outside.safetensors")
print(type(model).__name__, type(model).__module__)
"""


def _site_dirs() -> list[str]:
    dirs = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def _llama_tied_gqa() -> LlamaForCausalLM:
    """GQA with tied embeddings (like SmolLM2)."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**tiny_config(6, 3, layers=3).to_dict(), "tie_word_embeddings": True})
    return _widen(LlamaForCausalLM(config))


def _qwen2() -> Qwen2ForCausalLM:
    """Qwen2 carries q/k/v biases, which the shipped code must keep."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return _widen(Qwen2ForCausalLM(config))


def _widen(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def _prune_unevenly(model) -> None:
    """Every block a different shape, with FLAP-style compensation biases on some blocks only."""
    gen = torch.Generator().manual_seed(3)
    hidden = model.config.hidden_size
    for i, layer in enumerate(decoder_layers(model)):
        n_kv = layer.self_attn.k_proj.out_features // layer.self_attn.head_dim
        keep_kv = [k for k in range(n_kv) if k != i % n_kv]
        extra_o = torch.randn(hidden, generator=gen) if i % 2 == 0 else None
        shrink_attention(layer.self_attn, keep_kv, [0, 1], extra_o_bias=extra_o)
        neurons = layer.mlp.gate_proj.out_features
        extra_down = torch.randn(hidden, generator=gen) if i % 2 == 1 else None
        shrink_mlp(layer.mlp, list(range(0, neurons - 8 * i, 1 + i % 2)), extra_down_bias=extra_down)


@pytest.mark.slow  # a fresh Python without fang per model, about 5 s each
@pytest.mark.parametrize("build", [_llama_tied_gqa, _qwen2], ids=["llama-gqa-tied", "qwen2"])
def test_loads_without_fang_with_identical_logits(build, tmp_path):
    model = build()
    _prune_unevenly(model)
    save_pruned(model, tiny_tokenizer(), tmp_path / "saved")
    # a copy elsewhere: the shipped code must not rely on where fang wrote it
    ckpt = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(tmp_path / "saved", ckpt)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(7))
    (ckpt.parent / "ids.json").write_text(json.dumps(ids.tolist()))

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", OUTSIDE_FANG, str(ckpt), json.dumps(_site_dirs())],
                          cwd=tmp_path / "elsewhere", capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("FangPruned") and "transformers_modules" in proc.stdout

    outside = load_file(str(ckpt.parent / "outside.safetensors"))
    reference, _ = load_pruned(tmp_path / "saved")
    with torch.no_grad():
        expected = reference(ids).logits
    assert torch.equal(outside["logits"], expected)
    generated = outside["generated"]
    prompt_len = len(tiny_tokenizer()("the cat")["input_ids"])
    assert generated.shape[0] == 1 and prompt_len < generated.shape[1] <= prompt_len + 6  # may stop at EOS
    with torch.no_grad():  # each generated token is fang's model's greedy choice given the tokens before it
        choices = reference(generated[:, :-1]).logits[0, prompt_len - 1 :].argmax(-1)
    assert torch.equal(choices, generated[0, prompt_len:])


def test_config_lists_every_block_and_points_at_the_shipped_code(tmp_path):
    model = _llama_tied_gqa()
    _prune_unevenly(model)
    save_pruned(model, tiny_tokenizer(), tmp_path / "p")
    config = json.loads((tmp_path / "p/config.json").read_text())
    sizes = [(l["n_heads"], l["n_kv_heads"], l["intermediate_size"]) for l in config["pruned_layers"]]
    assert sizes == [(4, 2, 64), (4, 2, 28), (4, 2, 48)]
    assert [l["o_bias"] for l in config["pruned_layers"]] == [True, False, True]
    assert config["model_type"] == "llama"  # fang's own loader still resolves the family
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fang_pruned.FangPrunedLlamaForCausalLM"
    shipped = (tmp_path / "p/modeling_fang_pruned.py").read_text()
    assert "import fang" not in shipped and "from fang" not in shipped


def test_unsupported_architecture_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "num_hidden_layers": 1}))
    with pytest.raises(FangError, match="no portable modeling code for model type 'gpt2'"):
        write_portable_code(tmp_path, [{}])
