"""What prune.align buys in prompt-processing speed, from shapes alone (fang.tools.bench.align).

Random-weight models with the dense model's config and a prune report's per-block widths: the dense
model, the widths as pruned, and the same widths aligned to each --align as planning would align them;
transformers on the CPU, one thread, a --prompt-len prompt in one forward, --repeats interleaved rounds,
median. Writes --out (JSON: every run with its load average) and prints a Markdown table.

    python studies/diagnostics/align_speed.py --report artifacts/sweep/o_fang-0.3.prune.json \
        --config artifacts/model/config.json --align 8,32,64 --dtype float32,bfloat16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fang.core.atomic import write_json  # noqa: E402
from fang.core.errors import FangError  # noqa: E402
from fang.tools.bench.align import load_inputs, measure_align_speed, render_table  # noqa: E402
from fang.tools.bench.machine import machine_info  # noqa: E402


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise FangError(f"--align={text!r}: expected comma-separated integers, e.g. 8,32,64") from None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default="artifacts/sweep/o_fang-0.3.prune.json", help="a prune report (.prune.json)")
    ap.add_argument("--config", default="artifacts/model/config.json", help="the dense model's config.json or folder")
    ap.add_argument("--align", default="8,32,64")
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="artifacts/diagnostics/align_speed.json")
    a = ap.parse_args(argv)
    config, ffn, heads = load_inputs(a.report, a.config)
    result = measure_align_speed(config, ffn, heads, _ints(a.align), [d.strip() for d in a.dtype.split(",")],
                                 a.prompt_len, a.repeats, a.threads)
    result.update(report=str(a.report), config=str(a.config), machine=machine_info("cpu"))
    write_json(a.out, result)
    print(render_table(result))
    print(f"llama-cpp-python importable: {result['llama_cpp_python']}; written {a.out}")
    return result


if __name__ == "__main__":
    try:
        main()
    except FangError as e:
        sys.exit(f"error: {e}")
