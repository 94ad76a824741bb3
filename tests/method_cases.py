"""Every existing pruning method (and the variants flap+uniform, obc+fc, o_fang+layer) on one tiny model:
the cases of tests/test_method_regression.py, and a script that saves their pruned state_dicts.

    PYTHONPATH=<code root>:<code root>/tests python tests/method_cases.py save DIR
    PYTHONPATH=<code root>:<code root>/tests python tests/method_cases.py compare DIR   # torch.equal, tensor by tensor
    PYTHONPATH=<code root>:<code root>/tests python tests/method_cases.py fingerprint FILE

`save` on the code before a refactor and `compare` after it checks that the refactor changed no bit.
The fingerprints (shapes, float64 sums and sums of squares, the prune report) are what the regression
test keeps: they survive another machine's last-bit rounding, the state_dicts would not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from conftest import captured, tiny_model

try:  # the methods package (after the refactor) or the flat modules (before it)
    from fang.methods.driver import PruneOptions, prune_model

    INPUTS_KW = "inputs"
except ImportError:  # pragma: no cover - only for running this file against the old code
    from fang.prune import PruneOptions, prune_model

    INPUTS_KW = "fang_inputs"

# (case name, method, gqa scheme, PruneOptions kwargs, per-block FANG sparsity or None)
CASES = [
    ("flap", "flap", "kv_group", {}, None),
    ("flap+uniform", "flap", "kv_group", {"allocation": "uniform"}, None),
    ("flap-query_slot", "flap", "query_slot", {}, None),
    ("wanda_sp", "wanda_sp", "kv_group", {}, None),
    ("magnitude", "magnitude", "kv_group", {}, None),
    ("obc", "obc", "kv_group", {}, None),
    ("obc-query_slot", "obc", "query_slot", {}, None),
    ("obc_iter", "obc_iter", "kv_group", {}, None),
    ("obc+fc", "obc", "kv_group", {"allocation": "fc", "block_sparsity": [0.2, 0.3, 0.4]}, None),
    ("f_fang", "f_fang", "kv_group", {"tau": 1.0}, [0.2, 0.3, 0.4]),
    ("o_fang", "o_fang", "kv_group", {"tau": 1.0}, [0.2, 0.3, 0.4]),
    ("o_fang+layer", "o_fang", "kv_group", {"tau": 1.0, "compensation": "layer"}, [0.2, 0.3, 0.4]),
]
SPARSITY = 0.3


def calibration() -> torch.Tensor:
    return torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(5))


def run_case(case, tmp: Path):
    """(pruned model, prune report dict) of one case on a fresh 3-block GQA model (6 query / 3 KV heads)."""
    name, method, scheme, opts, fang_sparsity = case
    model = tiny_model(6, 3, layers=3)
    where = tmp / name.replace("+", "_")
    where.mkdir(parents=True, exist_ok=True)
    cap = captured(model, calibration(), where, batch_size=3)
    kw = {}
    if fang_sparsity is not None:
        from test_fang_prune import make_fang_inputs

        kw[INPUTS_KW] = make_fang_inputs(cap, fang_sparsity)
    report = prune_model(model, cap, method, SPARSITY, scheme, batch_size=4, options=PruneOptions(**opts), **kw)
    return model, report.as_dict()


def fingerprint(model, report: dict) -> dict:
    tensors = {k: [list(v.shape), float(v.double().sum()), float(v.double().square().sum())]
               for k, v in model.state_dict().items()}
    return {"tensors": tensors, "report": report}


def main(argv: list[str]) -> None:
    import tempfile

    action, target = argv[0], Path(argv[1])
    prints = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            model, report = run_case(case, Path(tmp))
            name = case[0]
            if action == "save":
                target.mkdir(parents=True, exist_ok=True)
                torch.save({"state": model.state_dict(), "report": report}, target / f"{name}.pt")
            elif action == "compare":
                ref = torch.load(target / f"{name}.pt", weights_only=True)
                state = model.state_dict()
                assert list(state) == list(ref["state"]), f"{name}: tensor names differ"
                diff = [k for k in state if not torch.equal(state[k], ref["state"][k])]
                same_report = report == ref["report"]
                print(f"{name}: {len(state) - len(diff)}/{len(state)} tensors equal, report {'equal' if same_report else 'DIFFERS'}"
                      + (f"; differ: {diff}" if diff else ""))
                prints[name] = not diff and same_report
            else:
                prints[name] = fingerprint(model, report)
    if action == "fingerprint":
        target.write_text(json.dumps(prints, indent=1) + "\n")
    if action == "compare" and not all(prints.values()):
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
