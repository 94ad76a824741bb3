"""group: per layer, a shared neuron group and k equal functional groups from the Taylor scores."""

import numpy as np
import torch

from fang.analysis.grouping import neuron_groups
from fang.analysis.store import open_store, write_store
from fang.core import paths
from fang.core.atomic import write_json
from fang.core.params import load_block
from fang.core.progress import console, progress
from fang.core.outputs import take_lock


def run(params_path: str = "params.yaml", source: str | None = None, analysis: str | None = None) -> None:
    p = load_block("group", path=params_path, analysis=analysis)
    art = paths.calibration_artifacts(source, analysis)
    take_lock(art.groups)  # one writer at a time (fang.core.outputs)
    taylor = open_store(art.taylor, "taylor", "taylor")
    scores = torch.from_numpy(taylor["scores"][:]).double()
    n_layers, k, n_ffn = scores.shape
    groups = np.zeros((n_layers, n_ffn), np.int32)
    per_layer = []
    with progress() as bar:
        task = bar.add_task("group", total=n_layers)
        for li in range(n_layers):
            ids, info = neuron_groups(scores[li], p.method, p.seed + li, shared_ratio=p.shared_ratio)
            groups[li] = ids.numpy()
            per_layer.append({"layer": li, **{key: v for key, v in info.items() if not isinstance(v, (list, tuple))}})
            bar.advance(task)
    write_store(art.groups, "groups", {"neuron_groups": groups}, {"k": k, "method": p.method, "seed": p.seed})
    summary = {"method": p.method, "k": k, "shared_ratio": p.shared_ratio, "shared_size": int((groups[0] == k).sum()),
               "layers": per_layer}
    if p.method == "lap":
        exact = sum(x["total_score"] for x in per_layer)
        greedy = sum(x["greedy_total_score"] for x in per_layer)
        summary["exact_total_score"], summary["greedy_total_score"] = exact, greedy
        summary["exact_gain_over_greedy_relative"] = (exact - greedy) / greedy if greedy else 0.0
    write_json(art.metrics / "groups.json", summary)
    console.print(f"neuron groups ({p.method}) for {n_layers} layers: k={k} functional + 1 shared -> {art.groups}")
