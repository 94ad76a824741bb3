"""ica: per layer, CanICA of the FFN's act_fn(gate_proj(x)) and up_proj(x) over the calibration tokens.

Writes artifacts/ica.zarr (spatial maps z-scored across neurons, the ranked score per neuron) and
artifacts/metrics/ica.json. RAM holds one layer's [T, 2 n_ffn] float32 matrix at a time.
"""

from __future__ import annotations

import time

import numpy as np

from fang.analysis.ica import IcaConsumer, prunable_layers
from fang.analysis.store import write_store
from fang.core import paths
from fang.core.atomic import write_json
from fang.core.device import dtype_record, pick_device
from fang.core.params import load_block
from fang.core.progress import console
from fang.core.outputs import take_lock
from fang.model.mlp_stream import stream_mlp
from fang.model.offload import load_for_block_passes

def run(params_path: str = "params.yaml", source: str | None = None) -> None:
    from fang.data.corpus import load_calibration

    p = load_block("ica", path=params_path)
    take_lock(paths.calibration_artifacts(source).ica)  # one writer at a time (fang.core.outputs)
    ids = load_calibration(source)
    device = pick_device()
    model_p = load_block("model", path=params_path)  # offload: where block weights wait; compute_dtype: what they run in
    model, _, dtype = load_for_block_passes(paths.MODEL, device, model_p)  # stream_mlp runs one block at a time
    cfg = model.config
    n_tok, n_ffn, n_layers = ids.numel(), cfg.intermediate_size, cfg.num_hidden_layers
    consumer = IcaConsumer(p, n_tok, n_layers, n_ffn)
    t0 = time.perf_counter()
    timing = stream_mlp(model, ids, consumer, p.batch_size, device, label="ica")
    total = time.perf_counter() - t0
    out = paths.calibration_artifacts(source).ica
    write_store(out, "ica", {"maps": consumer.maps, "neuron_score": consumer.score}, {
        "n_layers": n_layers, "intermediate_size": n_ffn, "n_components": p.n_components, "tokens": n_tok,
        "columns": "maps[l, k, :n_ffn] = act_fn(gate_proj) columns, maps[l, k, n_ffn:] = up_proj columns",
        "prunable_layers": prunable_layers(n_layers), **dtype_record(dtype),
    })
    write_json(paths.calibration_artifacts(source).metrics / "ica.json", {
        "n_components": p.n_components, "tokens": n_tok, "layers": consumer.layers,
        "mean_explained_variance": round(float(np.mean([x["explained_variance"] for x in consumer.layers])), 4),
        "seconds": {"total": round(total, 1), "forward": round(timing["forward_s"], 1),
                    "decomposition": round(timing["consumer_s"], 1), "forward_cpu": round(timing["forward_cpu_s"], 1),
                    "decomposition_cpu": round(timing["consumer_cpu_s"], 1)},
    })
    console.print(f"ica: {n_layers} layers x {p.n_components} components over {n_tok:,} tokens -> {out} "
                  f"(forward {timing['forward_s']:.1f} s, decomposition {timing['consumer_s']:.1f} s)")
