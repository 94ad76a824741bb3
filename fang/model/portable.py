"""Making a pruned checkpoint loadable by stock transformers (no fang needed to load it).

`save_pruned` calls `write_portable_code` on the directory it is building: the two modules of
`fang/hf_code/` are copied next to the weights with the base architecture's class names, and
config.json gains the per-block sizes (`pruned_layers`), an `auto_map` pointing at the shipped
classes and their architecture name. Then

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

builds the same model `load_pruned` builds. `model_type` is left as the dense one so that fang's
own loader (and anything reading config.json without remote code) still resolves the family.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.errors import require

CODE_DIR = Path(__file__).parent / "hf_code"
CONFIG_MODULE = "configuration_fang_pruned"
MODELING_MODULE = "modeling_fang_pruned"
# the shipped code is written for Llama; these are the transformers class-name stems of the others
CLASS_STEMS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def class_names(model_type: str) -> tuple[str, str]:
    """(config class, model class) names the checkpoint ships for a dense `model_type`."""
    require(model_type in CLASS_STEMS, f"no portable modeling code for model type {model_type!r} "
            f"(supported: {', '.join(CLASS_STEMS)})")
    stem = CLASS_STEMS[model_type]
    return f"FangPruned{stem}Config", f"FangPruned{stem}ForCausalLM"


def portable_source(module: str, model_type: str) -> str:
    """Source of one shipped module for `model_type` (Llama names swapped for the base's)."""
    class_names(model_type)  # validates
    text = (CODE_DIR / f"{module}.py").read_text()
    return text.replace("Llama", CLASS_STEMS[model_type])


def write_portable_code(directory: str | os.PathLike, layers: list[dict]) -> None:
    """Ship the modeling code into `directory` (which already holds the dense config.json) and point config.json at it."""
    directory = Path(directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    config_cls, model_cls = class_names(model_type)
    require(
        len(layers) == config.get("num_hidden_layers"),
        f"{len(layers)} pruned layers for a config with {config.get('num_hidden_layers')} layers",
    )
    for module in (CONFIG_MODULE, MODELING_MODULE):
        (directory / f"{module}.py").write_text(portable_source(module, model_type))
    config["pruned_layers"] = [
        {k: layer[k] for k in ("n_heads", "n_kv_heads", "intermediate_size", "o_bias", "down_bias")} for layer in layers
    ]
    config["architectures"] = [model_cls]
    config["auto_map"] = {
        "AutoConfig": f"{CONFIG_MODULE}.{config_cls}",
        "AutoModelForCausalLM": f"{MODELING_MODULE}.{model_cls}",
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
