"""summary: dense vs pruned perplexity, accuracy, size and speed on one screen (artifacts/summary.md)."""

from fang.core import paths
from fang.core.atomic import atomic_file, read_json, write_json
from fang.core.device import pick_device
from fang.core.progress import console
from fang.evaluation.summary import render, summarize
from fang.tools.bench.inference import ModelEntry, checkpoint_bytes, measure_inference


def run(prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3) -> None:
    dense, pruned = read_json(paths.METRICS / "dense.json"), read_json(paths.METRICS / "pruned.json")
    prune = read_json(paths.METRICS / "prune.json")
    device = pick_device()
    speed = None
    sizes = {}
    entries = [ModelEntry("dense", paths.MODEL, "dense"), ModelEntry("pruned", paths.PRUNED, "pruned", prune)]
    if repeats > 0:
        inf = measure_inference(entries, [1], prompt_len, new_tokens, repeats, device)
        speed = {m["name"]: m["runs"][0] for m in inf["models"]}
        speed["setup"] = {"prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats, "device": str(device)}
        sizes = {m["name"]: {k: m[k] for k in ("block_params", "total_params", "checkpoint_bytes")} for m in inf["models"]}
    else:  # no timing asked: sizes from the metrics and the files alone
        for e, m in zip(entries, (dense, pruned)):
            sizes[e.name] = {"block_params": m["block_params"], "total_params": None,
                             "checkpoint_bytes": checkpoint_bytes(e.path)}
    summary = summarize(dense, pruned, prune, sizes, speed)
    text = render(summary)
    write_json(paths.METRICS / "summary.json", summary)
    with atomic_file(paths.ARTIFACTS / "summary.md") as fh:
        fh.write(text)
    console.print(text)
