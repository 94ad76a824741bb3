"""Does a refit that tracks the dense model better on the calibration tokens also do so on held-out text?

The dense-target refit (SoBP's module-wise reconstruction, and our o_fang+dense) is built to bring each
module's output closer to the dense model's on the calibration tokens. This measures, for each pruned model
given, on the first N calibration sequences (the capture's token ids) and on N held-out windows of the test
split (the articles the perplexity is measured on, concatenated in file order, cut into seq_len windows):
the mean next-token loss (the dense model's beside it), and the relative error of the final hidden states
against the dense model's, ||h - h_dense|| / ||h_dense||. A refit that lowers the calibration error but
raises the held-out loss fits the calibration set, not the model. Writes
artifacts/diagnostics/calibration_fit.json; numbers in the docs are read from that file.

    python studies/diagnostics/calibration_fit.py MODEL_DIR [MODEL_DIR ...] [--n 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fang.analysis.capture import open_capture  # noqa: E402
from fang.core import paths  # noqa: E402
from fang.core.atomic import write_json  # noqa: E402
from fang.core.device import pick_device  # noqa: E402
from fang.core.errors import require  # noqa: E402
from fang.data.corpus import read_jsonl  # noqa: E402
from fang.model.shrink import load_any  # noqa: E402

OUT = paths.ARTIFACTS / "diagnostics" / "calibration_fit.json"


def token_sets(n: int, tokenizer) -> dict[str, torch.Tensor]:
    cap = open_capture(paths.CAPTURE)
    calib = torch.from_numpy(cap["token_ids"][:n].astype("int64"))
    seq_len = calib.shape[1]
    ids, rows = [], read_jsonl(paths.DATA / "test.jsonl")
    for row in rows:  # concatenate test articles in file order until n windows are filled
        ids += tokenizer(row["text"]).input_ids
        if len(ids) >= n * seq_len:
            break
    require(len(ids) >= n * seq_len, f"the test split holds fewer than {n} x {seq_len} tokens")
    return {"calibration": calib, "held_out": torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)}


@torch.no_grad()
def final_states(model_dir: str, sets: dict[str, torch.Tensor], device) -> dict[str, tuple[float, torch.Tensor]]:
    model, _ = load_any(model_dir, device, "float32", "none")
    out = {}
    for name, ids in sets.items():
        res = model(ids.to(device), labels=ids.to(device), output_hidden_states=True)
        out[name] = (float(res.loss), res.hidden_states[-1].float().cpu())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--n", type=int, default=4, help="sequences per set (calibration, held-out)")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    device = pick_device()
    sets = token_sets(a.n, AutoTokenizer.from_pretrained(str(paths.MODEL)))
    t0 = time.time()
    dense = final_states(str(paths.MODEL), sets, device)
    rows = []
    for model_dir in a.models:
        got = final_states(model_dir, sets, device)
        row = {"model": model_dir}
        for name in sets:
            loss, h = got[name]
            row[name] = {"loss": round(loss, 4), "dense_loss": round(dense[name][0], 4),
                         "rel_err_final_hidden": round(float((h - dense[name][1]).norm() / dense[name][1].norm()), 4)}
        rows.append(row)
        print(row)
    write_json(OUT, {"sequences_per_set": a.n, "seq_len": int(sets["calibration"].shape[1]), "models": rows,
                     "seconds": round(time.time() - t0, 1)})
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
