"""Peak RSS of every model-running stage, each in its own process, with model.offload none and disk, at two depths.

    PYTHONPATH=.:tests python tools/stream_rss.py WORKDIR [--layers 8,32] [--hidden 512] [--ffn 2048]

Builds the tiny project of tests/stream_project.py around a random LLaMA of the given shape (checkpoint in
shards of about one block), runs calibrate -> bench once per (depth, offload) and prints, per stage, the peak
resident set (ru_maxrss of that stage's process, from os.wait4) as a Markdown table. The numbers in
docs/scale.md ("Every stage streams") come from it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("calibrate", "capture", "cluster", "taylor", "group", "allocate", "prune", "evaluate", "ica",
          "gprune_modules", "attribute", "screen_tasks", "bench")

_CHILD = """
import sys
sys.path[:0] = {path!r}
import stream_project as sp
from pathlib import Path
steps = dict(sp.pipeline_steps(Path({root!r})))
import os
os.chdir({root!r})
steps[{stage!r}]()
"""


def run_stage(root: Path, stage: str, env: dict) -> tuple[int, float]:
    code = _CHILD.format(path=[str(Path.cwd()), str(Path.cwd() / "tests")], root=str(root), stage=stage)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()[-2000:]
    proc.stderr.close()
    if status != 0:
        raise SystemExit(f"{stage} failed in {root}:\n{err}")
    return usage.ru_maxrss * 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--layers", default="8,32")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=2048)
    args = ap.parse_args()
    # the parent stays small and imports no torch: Linux carries the RSS high-water mark of the forking
    # process over into the child's ru_maxrss (exec keeps it), so building the model here would show in every stage
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FANG_NO_PROGRESS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    hidden, ffn = args.hidden, args.ffn
    block = 4 * (2 * hidden * hidden + hidden * hidden + 3 * hidden * ffn)  # 8 query / 4 KV heads
    results = {}
    for layers in map(int, args.layers.split(",")):
        for offload in ("none", "disk"):
            root = Path(args.work) / f"L{layers}-{offload}"
            build = (f"import sys, yaml; sys.path[:0] = {[str(Path.cwd()), str(Path.cwd() / 'tests')]!r}\n"
                     "import stream_project as sp; from pathlib import Path\n"
                     f"sp.build(Path({str(root)!r}), {layers}, hidden={hidden}, ffn={ffn}, heads=8, kv_heads=4, "
                     f"shard_bytes={int(block * 1.05)})\n"
                     f"Path({str(root / 'params.yaml')!r}).write_text(yaml.safe_dump(sp.params({offload!r})))\n")
            subprocess.run([sys.executable, "-c", build], env=env, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            for stage in STAGES:
                rss, seconds = run_stage(root, stage, env)
                results[(layers, offload, stage)] = (rss, seconds)
                print(json.dumps({"layers": layers, "offload": offload, "stage": stage, "maxrss_mib": rss >> 20,
                                  "seconds": round(seconds, 1)}), flush=True)
    layer_list = list(map(int, args.layers.split(",")))
    head = " | ".join(f"{o}, {n} blocks" for n in layer_list for o in ("none", "disk"))
    print(f"\n| stage | {head} |\n|---|" + "---:|" * (2 * len(layer_list)))
    for stage in STAGES:
        cells = " | ".join(f"{results[(n, o, stage)][0] >> 20:,}" for n in layer_list for o in ("none", "disk"))
        print(f"| {stage} | {cells} |")


if __name__ == "__main__":
    main()
