"""Is MMLU worth a place in the default dev set? The dense model's MMLU accuracy on a seeded sample.

MMLU (the seed paper's Table 4) is opt-in (`data.tasks: [..., mmlu]`): this measures why. It builds
the MMLU task folder from the same pinned source as the main job (`data.task_source`), scores the
dense model on the first N questions of every subject (rows are shuffled by `data.split_seed`, so the
first N are a random sample) with lm-eval's mmlu_<subject> configs, and writes
artifacts/diagnostics/mmlu_dense.json: accuracy, lm-eval's standard error, questions, and how many
standard errors above the 25% chance level. Numbers in the docs are read from that file.

    python studies/diagnostics/mmlu_dense.py [questions_per_subject]   # default 10 (570 questions)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fang.core import paths  # noqa: E402
from fang.core.atomic import write_json  # noqa: E402
from fang.core.device import pick_device  # noqa: E402
from fang.core.params import load_block  # noqa: E402
from fang.data.paper_tasks import MMLU  # noqa: E402
from fang.data.tasks import build_task_folder  # noqa: E402
from fang.evaluation.evaluate import zero_shot  # noqa: E402
from fang.model.shrink import load_any  # noqa: E402


def main(per_subject: int = 10) -> dict:
    data, ev = load_block("data"), load_block("evaluate")
    device = pick_device()
    model, tokenizer = load_any(paths.MODEL, device, ev.dtype, "none")
    with tempfile.TemporaryDirectory(prefix="fang-mmlu-") as tmp:
        manifest = build_task_folder([MMLU], None, None, Path(tmp) / "tasks", seed=data.split_seed,
                                     task_source=data.task_source)
        subjects = manifest["tasks"][0]["lm_eval_tasks"]
        t0 = time.perf_counter()
        res = zero_shot(model, tokenizer, Path(tmp) / "tasks", subjects, per_subject, ev.batch_size, ev.shared_context)
        seconds = time.perf_counter() - t0
    m = res[MMLU]
    out = {"model": str(paths.MODEL), "dtype": ev.dtype, "questions_per_subject": per_subject, "subjects": len(subjects),
           "n": m["n"], "acc": m["acc"], "acc_stderr": m["acc_stderr"], "chance": 0.25,
           "z_above_chance": (m["acc"] - 0.25) / m["acc_stderr"], "seconds": round(seconds, 1),
           "task_source": data.task_source}
    write_json(ROOT / "artifacts" / "diagnostics" / "mmlu_dense.json", out)
    print(f"MMLU, dense, {out['n']} questions: {100 * out['acc']:.1f} ± {100 * out['acc_stderr']:.1f} "
          f"({out['z_above_chance']:+.1f} se from chance 25%), {seconds:.0f} s")
    return out


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
