"""ica: per layer, CanICA of the FFN's act_fn(gate_proj(x)) and up_proj(x) over the calibration tokens.

Writes artifacts/ica.zarr (spatial maps z-scored across neurons, the ranked score per neuron) and
artifacts/metrics/ica.json. RAM holds one layer's [T, 2 n_ffn] float32 matrix at a time.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor, nn

from fang.analysis.ica import canica, neuron_score, prunable_layers, zscore_columns
from fang.analysis.store import write_store
from fang.core import paths
from fang.core.atomic import write_json
from fang.core.device import pick_device
from fang.core.params import IcaParams, load_block
from fang.core.progress import console
from fang.core.outputs import take_lock
from fang.model.mlp_stream import stream_mlp
from fang.model.modeling import load_dense

# |z| thresholds reported in the summary: the number of key neurons each would keep per layer
REPORT_THRESHOLDS = (2.0, 3.0, 3.6, 5.0)


class _IcaConsumer:
    def __init__(self, p: IcaParams, n_tok: int, n_layers: int, n_ffn: int) -> None:
        self.p, self.n_ffn = p, n_ffn
        self.signals = torch.empty(n_tok, 2 * n_ffn, dtype=torch.float32)
        self.maps = np.zeros((n_layers, p.n_components, 2 * n_ffn), np.float32)
        self.score = np.zeros((n_layers, n_ffn), np.float32)
        self.layers: list[dict] = []

    def add(self, layer: int, rows: slice, act: Tensor, up: Tensor) -> None:
        self.signals[rows, : self.n_ffn] = act.cpu()
        self.signals[rows, self.n_ffn :] = up.cpu()

    def end_layer(self, layer: int, mlp: nn.Module) -> None:
        t0 = time.perf_counter()
        zscore_columns(self.signals, out=self.signals)
        res = canica(self.signals, self.p.n_components, self.p.n_restarts, self.p.seed + layer, self.p.max_iter,
                     self.p.tol, self.p.svd_iter)
        score = neuron_score(res.maps)
        self.maps[layer], self.score[layer] = res.maps.numpy(), score.numpy()
        self.layers.append({
            "layer": layer, "explained_variance": round(res.explained_variance, 4), "sparsity": round(res.sparsity, 2),
            "kept_restart": res.restart, "converged_restarts": res.converged,
            "key_neurons": {str(t): int((score > t).sum()) for t in REPORT_THRESHOLDS},
            "seconds": round(time.perf_counter() - t0, 2),
        })


def run(params_path: str = "params.yaml", source: str | None = None) -> None:
    from fang.data.corpus import load_calibration

    p = load_block("ica", path=params_path)
    take_lock(paths.calibration_artifacts(source).ica)  # one writer at a time (fang.core.outputs)
    ids = load_calibration(source)
    device = pick_device()
    model, _ = load_dense(paths.MODEL, device)
    cfg = model.config
    n_tok, n_ffn, n_layers = ids.numel(), cfg.intermediate_size, cfg.num_hidden_layers
    consumer = _IcaConsumer(p, n_tok, n_layers, n_ffn)
    t0 = time.perf_counter()
    timing = stream_mlp(model, ids, consumer, p.batch_size, device, label="ica")
    total = time.perf_counter() - t0
    out = paths.calibration_artifacts(source).ica
    write_store(out, "ica", {"maps": consumer.maps, "neuron_score": consumer.score}, {
        "n_layers": n_layers, "intermediate_size": n_ffn, "n_components": p.n_components, "tokens": n_tok,
        "columns": "maps[l, k, :n_ffn] = act_fn(gate_proj) columns, maps[l, k, n_ffn:] = up_proj columns",
        "prunable_layers": prunable_layers(n_layers),
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
