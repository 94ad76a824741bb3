"""Run by tests/test_stream_all.py in a subprocess: the whole pipeline with model.offload=disk under an
address-space cap (RLIMIT_AS) smaller than the model's weights. Prints one JSON line.

    python stream_capped.py WORKDIR LAYERS HIDDEN FFN HEADROOM_FRACTION

1. A warm-up runs every stage on a 2-block model of the same width, so the libraries, the allocator's
   pools and the threads every stage needs are in the address space before it is measured.
2. The cap: the address space now (VmSize) + HEADROOM_FRACTION x the deep model's weight bytes.
3. Every stage on the deep model (LAYERS blocks), fetch_model included, streamed from disk: must succeed.
4. The control: loading the deep model (fetch_model's copy) whole under the same cap must fail.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def vm_size() -> int:
    """Bytes of address space mapped now (what RLIMIT_AS limits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def main() -> None:
    import torch

    import stream_project as sp

    work, layers, hidden, ffn, fraction = Path(sys.argv[1]), *map(int, sys.argv[2:5]), float(sys.argv[5])
    torch.set_num_threads(1)
    shape = dict(hidden=hidden, ffn=ffn, heads=4, kv_heads=2)
    # shards of about one block: a single-file checkpoint is memory-mapped whole by safetensors, and a mapping
    # counts against RLIMIT_AS even where no page of it is read (big checkpoints come in shards anyway)
    block_bytes = 4 * (2 * hidden * hidden + 2 * hidden * hidden // 2 + 3 * hidden * ffn)
    shard = int(block_bytes * 1.05)
    t0 = time.perf_counter()
    sp.build(work / "warm", 2, shard_bytes=shard, **shape)
    sp.run_pipeline(work / "warm", "disk")
    sp.build(work / "deep", layers, shard_bytes=shard, **shape)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(work / "deep" / sp.SOURCE)
    from fang.model.offload import load_dense_offloaded

    model, _ = load_dense_offloaded(work / "deep" / sp.SOURCE, offload="disk")
    from fang.model.modeling import decoder_layers

    per_block = [sum(t.numel() * t.element_size() for t in layer.state_dict().values())
                 for layer in decoder_layers(model)]
    outside = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
    del model
    weights = sum(per_block) + outside
    warm_seconds = time.perf_counter() - t0

    baseline = vm_size()
    cap = baseline + int(fraction * weights)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
    done = []
    t0 = time.perf_counter()
    try:
        sp.run_pipeline(work / "deep", "disk", log=lambda stage: done.append((stage, vm_size() - baseline)))
        error = None
    except BaseException as exc:  # reported, not raised: the parent test names the stage that did not fit
        error = f"{type(exc).__name__}: {exc}"[:500]
    capped_seconds = time.perf_counter() - t0
    after = vm_size()
    control = None
    if error is None:
        from fang.model.modeling import load_dense

        try:
            whole, _ = load_dense(work / "deep/artifacts/model")
            control = "loaded"
            del whole
        except BaseException as exc:
            control = f"{type(exc).__name__}: {str(exc)[:200]}"
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print(json.dumps({"layers": cfg.num_hidden_layers, "weight_bytes": weights, "block_bytes": max(per_block),
                      "baseline_as": baseline, "cap_as": cap, "headroom": cap - baseline, "as_after": after,
                      "stages_done": done, "error": error, "control": control,
                      "warm_seconds": round(warm_seconds, 1), "capped_seconds": round(capped_seconds, 1),
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
