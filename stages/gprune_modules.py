"""gprune_modules: per-source neuron scores, rank drift, modules and their reliability (GPrune-LLM), per layer.

The calibration tokens' article topics are the sources. One dense pass streams each MLP's
activations into per-source moments; nothing per token is kept. Writes artifacts/gprune.zarr and
artifacts/metrics/gprune.json.
"""

from __future__ import annotations

import time

import numpy as np

from fang.analysis.gprune import GPruneConsumer
from fang.analysis.store import write_store
from fang.core import paths
from fang.core.atomic import read_json, write_json
from fang.core.device import dtype_record, pick_device
from fang.core.errors import FangError, require
from fang.core.integrity import read_config
from fang.core.params import load_block
from fang.core.outputs import take_lock
from fang.core.progress import console
from fang.data.corpus import read_jsonl
from fang.data.sources import shard_sources, source_index, token_topics
from fang.model.mlp_stream import stream_mlp
from fang.model.offload import load_for_block_passes


def run(params_path: str = "params.yaml", source: str | None = None) -> None:
    from transformers import AutoTokenizer

    from fang.data.corpus import load_calibration

    p = load_block("gprune", path=params_path)
    art = paths.calibration_artifacts(source)
    take_lock(art.gprune)  # one writer at a time (fang.core.outputs)
    ids = load_calibration(source)
    meta = read_json(art.calib / "calib.json")
    rows = read_jsonl(paths.DATA / f"{meta['split']}.jsonl")
    topics = token_topics(ids, meta["window_articles"], rows, AutoTokenizer.from_pretrained(paths.MODEL))
    kind = "topics"
    try:
        src, names, counts = source_index(topics, p.sources, p.min_source_tokens)
    except FangError:
        if p.sources:
            raise
        # a one-topic calibration (calibrate.topics: [People]) has one distribution: compare shards of it instead
        src, names = shard_sources(*ids.shape)
        counts, kind = {n: int((src == i).sum()) for i, n in enumerate(names)}, "shards"
        console.print(f"[yellow]gprune: fewer than 2 topics with >= {p.min_source_tokens} calibration tokens; "
                      f"the sources are {len(names)} shards of the calibration windows[/yellow]")
    device = pick_device()
    n_ffn = read_config(paths.MODEL).get("intermediate_size", 0)
    require(p.n_modules <= n_ffn, f"gprune.n_modules={p.n_modules} is more than the {n_ffn} FFN neurons of a layer: "
                                  f"give at most {n_ffn}")
    model_p = load_block("model", path=params_path)  # offload: where block weights wait; compute_dtype: what they run in
    model, _, dtype = load_for_block_passes(paths.MODEL, device, model_p)  # stream_mlp runs one block at a time
    cfg = model.config
    consumer = GPruneConsumer(p, src, len(names), cfg.num_hidden_layers, cfg.intermediate_size)
    t0 = time.perf_counter()
    timing = stream_mlp(model, ids, consumer, p.batch_size, device, label="gprune")
    total = time.perf_counter() - t0
    out = art.gprune
    write_store(out, "gprune", consumer.out, {
        "sources": names, "source_kind": kind, "source_tokens": [counts[n] for n in names], "metric": p.metric,
        "n_layers": cfg.num_hidden_layers, "intermediate_size": cfg.intermediate_size,
        **dtype_record(dtype),
    })
    layers = consumer.layers
    write_json(art.metrics / "gprune.json", {
        "sources": dict(zip(names, (counts[n] for n in names))), "source_kind": kind,
        "unused_tokens": int((src < 0).sum()),
        "metric": p.metric, "switched_modules": sum(x["switched"] for x in layers),
        "switched_neurons": sum(x["switched_neurons"] for x in layers),
        "mean_module_tau": round(float(np.nanmean(consumer.out["module_tau"])), 4),
        "layers": layers,
        "seconds": {"total": round(total, 1), "forward": round(timing["forward_s"], 1),
                    "analysis": round(timing["consumer_s"], 1), "forward_cpu": round(timing["forward_cpu_s"], 1),
                    "analysis_cpu": round(timing["consumer_cpu_s"], 1)},
    })
    console.print(f"gprune: {len(names)} sources, {cfg.num_hidden_layers} layers -> {out} "
                  f"({sum(x['switched'] for x in layers)} modules switched to magnitude; "
                  f"forward {timing['forward_s']:.1f} s, analysis {timing['consumer_s']:.1f} s)")
