"""Memory: the capture store's bytes per token and layer (from its arrays), and an estimate for LLaMA-2-7B whose
formulas are written out."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ...analysis.capture import FULL_ARRAYS
from ...core.errors import FangError, require

LLAMA2_7B = {
    "name": "LLaMA-2-7B",
    "n_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "n_heads": 32,
    "n_kv_heads": 32,
    "head_dim": 128,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


# ------------------------------------------------------------------------------------------------------------
# memory


def _dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _dims(n_layers: int, hidden: int, ffn: int, n_heads: int, head_dim: int) -> dict[str, int]:
    return {"hidden_size": hidden, "intermediate_size": ffn, "attn_width": n_heads * head_dim}


def capture_footprint(store_path: str | os.PathLike) -> dict:
    """Bytes per calibration token and layer of a capture store, from its arrays' shapes and dtypes.

    Every array is described by how it scales: per token and layer ([layers(+1), T, width]),
    per layer ([layers, width], the input statistics) or per token (token_ids). Widths are named
    by the config dimension they equal, so the same layout can be projected onto another model.
    Disk bytes are the array's files as stored (Zarr's default compression), logical bytes
    shape x itemsize.
    """
    from ...analysis.capture import open_capture

    store_path = Path(store_path)
    group = open_capture(store_path)
    a = group.attrs
    n_layers, n_samples, seq_len = int(a["n_layers"]), int(a["n_samples"]), int(a["seq_len"])
    dims = _dims(n_layers, int(a["hidden_size"]), int(a["intermediate_size"]), int(a["n_heads"]), int(a["head_dim"]))
    n_tok = n_samples * seq_len
    if a.get("pca_dim"):  # projected features: a fixed width (cluster.pca_dim), whatever the model
        dims["pca_dim"] = int(a["pca_dim"])
    arrays = []
    for name, arr in sorted(group.arrays(), key=lambda kv: kv[0]):
        shape = tuple(int(s) for s in arr.shape)
        itemsize = arr.dtype.itemsize
        logical = math.prod(shape) * itemsize
        entry: dict = {"name": name, "shape": list(shape), "dtype": str(arr.dtype), "itemsize": itemsize,
                       "logical_bytes": logical, "disk_bytes": _dir_size(store_path / name)}
        width = shape[-1]
        # name the width by the config dimension it equals (hidden first: attn_width often equals it)
        width_dim = next((k for k, v in dims.items() if v == width), None)
        if len(shape) == 3 and shape[1] == n_tok:
            entry.update(scales="token_layer", layer_offset=shape[0] - n_layers, width=width, width_dim=width_dim,
                         bytes_per_token_layer=width * itemsize)
        elif shape[0] == n_layers and name != "token_ids":  # statistics, FC, PCA: per layer, not per token
            entry.update(scales="layer", width=width, width_dim=width_dim)
        else:
            entry.update(scales="token", bytes_per_token=logical // max(n_tok, 1))
        arrays.append(entry)
    per_tl = [e for e in arrays if e["scales"] == "token_layer"]
    logical = sum(e["logical_bytes"] for e in arrays)
    disk = sum(e["disk_bytes"] for e in arrays)
    bulk_logical = sum(e["logical_bytes"] for e in per_tl)
    bulk_disk = sum(e["disk_bytes"] for e in per_tl)
    return {
        "path": str(store_path),
        "model": {"n_layers": n_layers, "hidden_size": dims["hidden_size"], "intermediate_size": dims["intermediate_size"],
                  "n_heads": int(a["n_heads"]), "head_dim": int(a["head_dim"])},
        "n_samples": n_samples,
        "seq_len": seq_len,
        "tokens": n_tok,
        "dtype": a.get("dtype"),
        "arrays": arrays,
        # block_io holds layers + 1 slices; per layer means per block here, its extra slice is listed apart
        "bytes_per_token_layer": sum(e["bytes_per_token_layer"] for e in per_tl),
        "pca_dim": dims.get("pca_dim"),
        "logical_bytes": logical,
        "disk_bytes": _dir_size(store_path),
        "arrays_disk_bytes": disk,
        # the features dominate the store; their ratio is what projects onto a larger model
        "compression_ratio": bulk_disk / bulk_logical if bulk_logical else None,
    }


def _param_count(m: dict) -> tuple[int, str]:
    d, f, h, kv, hd, v, n = (m["hidden_size"], m["intermediate_size"], m["n_heads"], m["n_kv_heads"], m["head_dim"],
                            m["vocab_size"], m["n_layers"])
    per_block = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f + 2 * d
    embeddings = v * d * (1 if m["tie_word_embeddings"] else 2)
    total = n * per_block + embeddings + d
    formula = (f"n_layers·(d·(heads+2·kv_heads)·head_dim + heads·head_dim·d + 3·d·ffn + 2·d) + vocab·d·{1 if m['tie_word_embeddings'] else 2} + d"
               f" = {n}·({d}·({h}+2·{kv})·{hd} + {h}·{hd}·{d} + 3·{d}·{f} + 2·{d}) + {v}·{d}·{1 if m['tie_word_embeddings'] else 2} + {d}")
    return total, formula


def store_bytes_formula(footprint: dict, model: dict, n_tok: int, itemsize: int) -> tuple[int, str, int]:
    """Logical bytes of the feature arrays of a capture store for `model` and `n_tok` tokens.

    Returns (bytes, formula with its numbers, elements per token). Applying this to the measured
    store's own model reproduces its logical size: that is the check of the projection.
    """
    dims = _dims(model["n_layers"], model["hidden_size"], model["intermediate_size"], model["n_heads"], model["head_dim"])
    if footprint.get("pca_dim"):
        dims["pca_dim"] = footprint["pca_dim"]
    terms, numbers, elements, total = [], [], 0, 0
    for e in footprint["arrays"]:
        if e["scales"] != "token_layer":
            continue
        if e["width_dim"] is None:
            raise FangError(f"capture array {e['name']} has width {e['width']}, which matches no model dimension")
        layers = model["n_layers"] + e["layer_offset"]
        width = dims[e["width_dim"]]
        # the full arrays take the store dtype (`itemsize`); the projected features stay float32
        size = itemsize if e["name"] in FULL_ARRAYS else e["itemsize"]
        elements += layers * width
        total += n_tok * layers * width * size
        terms.append(f"{e['name']}: (n_layers{'+' + str(e['layer_offset']) if e['layer_offset'] else ''})·{e['width_dim']}·{size} B")
        numbers.append(f"{layers}·{width}·{size}")
    formula = f"T·({' + '.join(terms)}) = {n_tok}·({' + '.join(numbers)})"
    return total, formula, elements


def estimate_memory(
    footprint: dict,
    target: dict | None = None,
    n_samples: int = 128,
    seq_len: int = 2048,
    batch_size: int = 8,
    feature_bytes: int = 2,
    weight_bytes: int = 2,
) -> dict:
    """Disk, RAM and GPU memory of the pipeline for `target` (default LLaMA-2-7B) at n_samples x seq_len tokens.

    - disk: the capture store's features (fp16), an uncompressed upper bound from the measured
      layout, and that bound times the compression ratio measured on `footprint`;
    - RAM: one block's hidden states for the whole calibration set in fp32 (N·L·d·4), which is
      what capture and prune hold; the store itself is never in RAM;
    - GPU: the fp16 weights plus the activations of one block for one batch of `batch_size`
      sequences; the eager attention score matrix is listed apart (fused SDPA/flash attention
      never materialises it).
    """
    m = dict(target or LLAMA2_7B)
    n_tok = n_samples * seq_len
    d, f, h, kv, hd = m["hidden_size"], m["intermediate_size"], m["n_heads"], m["n_kv_heads"], m["head_dim"]
    disk, disk_formula, elements = store_bytes_formula(footprint, m, n_tok, feature_bytes)
    ratio = footprint["compression_ratio"]

    ram = n_tok * d * 4
    params, params_formula = _param_count(m)
    weights = params * weight_bytes
    bl = batch_size * seq_len
    # live tensors of one block: input, normed input, attention output, residual (4·d); q, k, v
    # ((heads + 2·kv)·head_dim); MLP gate, up and act(gate)·up (3·ffn)
    act_width = 4 * d + (h + 2 * kv) * hd + 3 * f
    acts = bl * act_width * weight_bytes
    scores = batch_size * h * seq_len * seq_len * weight_bytes

    measured = footprint["model"]
    check_bytes, _, _ = store_bytes_formula(footprint, {**measured, "n_kv_heads": measured["n_heads"]},
                                            footprint["tokens"], _feature_itemsize(footprint))
    measured_features = sum(e["logical_bytes"] for e in footprint["arrays"] if e["scales"] == "token_layer")
    return {
        "model": m,
        "n_samples": n_samples,
        "seq_len": seq_len,
        "tokens": n_tok,
        "batch_size": batch_size,
        "disk": {
            "bytes_per_token_layer": disk / n_tok / m["n_layers"],
            "uncompressed_bytes": disk,
            "formula": disk_formula,
            "compression_ratio": ratio,
            "compressed_bytes": None if ratio is None else round(disk * ratio),
            "compression_measured_on": footprint["path"],
            "note": "per-layer input statistics (fp64, n_layers·(2·attn_width + 2·ffn)·8 B) and token_ids are negligible",
        },
        "ram": {
            "bytes": ram,
            "formula": f"N·L·d·4 B (fp32) = {n_samples}·{seq_len}·{d}·4",
        },
        "gpu": {
            "params": params,
            "params_formula": params_formula,
            "weights_bytes": weights,
            "weights_formula": f"params·{weight_bytes} B (fp16)",
            "activations_bytes": acts,
            "activations_formula": (f"b·L·(4·d + (heads+2·kv_heads)·head_dim + 3·ffn)·{weight_bytes} B = "
                                    f"{batch_size}·{seq_len}·(4·{d} + ({h}+2·{kv})·{hd} + 3·{f})·{weight_bytes}"),
            "attention_scores_bytes": scores,
            "attention_scores_formula": f"b·heads·L²·{weight_bytes} B = {batch_size}·{h}·{seq_len}²·{weight_bytes} (eager attention only)",
            "total_bytes": weights + acts,
            "total_bytes_eager": weights + acts + scores,
        },
        # the disk formula applied to the measured model must reproduce the measured store
        "check": {"formula_bytes_measured_model": check_bytes, "measured_feature_bytes": measured_features,
                  "ok": check_bytes == measured_features},
    }


def memory_part(footprint: dict, timings: list[dict], batch_size: int) -> dict:
    """The bench's memory part: the capture store's `footprint`, one block's hidden states in bytes, the peak RSS
    of the main job's streaming stages (from `timings`), and the estimate at capture's `batch_size`."""
    one_block = footprint["tokens"] * footprint["model"]["hidden_size"] * 4
    streaming = [{"label": e["label"], "peak_rss_mib": e["peak_rss_mib"]} for e in timings
                 if e["stage"] in ("capture", "cluster", "taylor", "prune") and e["peak_rss_mib"] is not None
                 and e.get("source") is None]
    return {"footprint": footprint, "one_block_bytes": one_block, "stage_rss": streaming,
            "estimate": estimate_memory(footprint, batch_size=batch_size)}


def _feature_itemsize(footprint: dict) -> int:
    sizes = {e["itemsize"] for e in footprint["arrays"] if e["scales"] == "token_layer" and e["name"] in FULL_ARRAYS}
    if not sizes:  # a slim store: nothing in the store dtype to measure, the formula does not use it
        return 2
    require(len(sizes) == 1, f"capture store {footprint['path']} mixes feature dtypes: {sorted(sizes)}")
    return sizes.pop()
