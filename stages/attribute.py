"""attribute: one block-by-block pass over the calibration set, hooks on every down_proj input,
-> artifacts/attribution.zarr (topic selectivity, labels, top contexts) + artifacts/attribution.json.

attribute-removed: which of those neurons a pruned model removed, per topic, beside its evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fang.analysis.attribute import (
    attribute,
    attribution_summary,
    calibration_topics,
    kept_neurons,
    permutation_null,
    removal_by_topic,
    removed_mask,
    stream_activations,
)
from fang.analysis.store import open_store, write_store
from fang.core import paths
from fang.core.atomic import read_json, write_json
from fang.core.errors import require
from fang.core.integrity import read_config
from fang.core.memory import check_fits
from fang.core.outputs import guard_output, take_lock
from fang.core.params import load_block
from fang.core.progress import console
from fang.data.corpus import load_calibration
from fang.evaluation.removal import removal_result

KIND = "attribution"


def run(params_path: str = "params.yaml") -> None:
    from fang.core.device import dtype_record, pick_device
    from fang.model.offload import load_for_block_passes

    p = load_block("attribute", path=params_path)
    take_lock(paths.ATTRIBUTION)  # one writer at a time (fang.core.outputs)
    input_ids = load_calibration(None)
    device = pick_device()
    cfg = read_config(paths.MODEL)  # float32 values + int64 indices per layer, top_k and neuron: allocated at once
    check_fits(cfg.get("num_hidden_layers", 0) * p.top_k * cfg.get("intermediate_size", 0) * 12,
               "the top contexts of every neuron", f"attribute.top_k={p.top_k}")
    model_p = load_block("model", path=params_path)  # offload: where block weights wait; compute_dtype: what they run in
    model, tokenizer, dtype = load_for_block_passes(paths.MODEL, device, model_p)  # run block by block
    owner, article_topic, articles, topics = calibration_topics(input_ids, tokenizer)
    owner[:, : p.skip_first] = -1
    acc = stream_activations(model, input_ids, owner, len(articles), p.batch_size, p.top_k, device)
    att = attribute(acc.sums.numpy(), acc.counts.numpy(), article_topic, topics, p.min_tokens, p.min_articles,
                    p.min_selectivity, p.fdr)
    token_topic = np.where(owner >= 0, article_topic[np.maximum(owner, 0)], -1)
    arrays = {
        "topic_mean_abs": att.topic_mean_abs, "mean_abs": att.mean_abs, "selectivity": att.selectivity,
        "q_value": att.q_value, "selective": att.selective, "label": att.label.astype(np.int16),
        "top_index": acc.top_index.numpy().transpose(0, 2, 1),  # [layers, n_ffn, k]
        "top_value": acc.top_value.numpy().transpose(0, 2, 1),
        "token_ids": input_ids.numpy().astype(np.int32), "token_topic": token_topic.astype(np.int16),
        "topic_tokens": att.topic_tokens, "topic_articles": att.topic_articles,
        # per article, so thresholds can be changed and nulls drawn without another forward pass
        "article_abs_sum": acc.sums.numpy().astype(np.float32), "article_tokens": acc.counts.numpy(),
        "article_topic": article_topic,
    }
    attrs = {"topics": topics, "guarded": [t for t, g in zip(topics, att.guarded) if g],
             "n_layers": int(att.label.shape[0]), "n_ffn": int(att.label.shape[1]), **dtype_record(dtype),
             "params": {k: getattr(p, k) for k in ("top_k", "skip_first", "min_tokens", "min_articles",
                                                    "min_selectivity", "fdr")}}
    write_store(paths.ATTRIBUTION, KIND, arrays, attrs)
    info = attribution_summary(att)
    thresholds = dict(min_tokens=p.min_tokens, min_articles=p.min_articles, min_selectivity=p.min_selectivity, fdr=p.fdr)
    info["selective_pairs"] = int(att.selective.sum())
    info["null_selective_pairs"] = permutation_null(acc.sums.numpy(), acc.counts.numpy(), article_topic, topics,
                                                    seed=p.seed, **thresholds)
    write_json(paths.ATTRIBUTION_SUMMARY, {**attrs, **info})
    n_sel = sum(t["selective_neurons"] for t in info["topics"])
    console.print(f"attribution: {len(topics)} topics, {n_sel:,} (layer, neuron, topic) selective pairs "
                  f"(with shuffled topics: {info['null_selective_pairs']}), "
                  f"{sum(info['labelled_neurons_by_layer']):,} of {att.label.size:,} neurons labelled -> {paths.ATTRIBUTION}")


# ---------------------------------------------------------------------------------------------- removed


def default_paths(model_dir: Path) -> tuple[Path, Path]:
    """(evaluation JSON, attribution JSON beside it) of a pruned model directory."""
    if model_dir.resolve() == paths.PRUNED.resolve():
        return paths.METRICS / "pruned.json", paths.METRICS / "pruned.attribution.json"
    return Path(f"{model_dir}.metrics.json"), Path(f"{model_dir}.attribution.json")


def run_removed(params_path: str, model: str, out: str | None = None, metrics: str | None = None,
                dense: str | None = None) -> None:
    p = load_block("attribute", path=params_path)
    model_dir = Path(model)
    guard_output(default_paths(model_dir)[1] if out is None else out, "attribution", "--out", [model_dir])
    store = open_store(paths.ATTRIBUTION, KIND, "attribute")
    topics = list(store.attrs["topics"])
    kept, kept_from = kept_neurons(model_dir, paths.MODEL, int(store.attrs["n_ffn"]))
    require(len(kept) == int(store.attrs["n_layers"]),
            f"{model_dir} has {len(kept)} layers, the attribution {store.attrs['n_layers']}")
    removed = removed_mask(kept, int(store.attrs["n_ffn"]))
    by_topic = removal_by_topic(store["selective"][:], store["topic_mean_abs"][:], removed)
    metrics_path, default_out = default_paths(model_dir)
    metrics_path = Path(metrics) if metrics else metrics_path
    dense_path = Path(dense) if dense else paths.METRICS / "dense.json"
    require(metrics is None or metrics_path.exists(), f"--metrics {metrics_path} does not exist")
    require(dense is None or dense_path.exists(), f"--dense {dense_path} does not exist")
    ppl = dense_ppl = None
    if metrics_path.exists() and dense_path.exists():
        ppl, dense_ppl = read_json(metrics_path)["ppl_by_topic"], read_json(dense_path)["ppl_by_topic"]
    result = removal_result(str(model_dir), kept_from, topics, removed, by_topic, ppl, dense_ppl, p.n_boot, p.seed)
    out_path = Path(out) if out else default_out
    write_json(out_path, result)
    worst = max(topics, key=lambda t: result["topics"][t]["mass_lost"])
    console.print(f"{model_dir}: {result['removed_fraction']:.1%} of FFN neurons removed; most activation mass lost on "
                  f"{worst} ({result['topics'][worst]['mass_lost']:.1%}) -> {out_path}")
