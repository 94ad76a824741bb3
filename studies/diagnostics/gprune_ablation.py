"""Which part of GPrune-LLM costs its perplexity: the reliability switch (weight-magnitude ranking in
flagged modules) or the module-wise sparsity? Prunes gprune with either or both switched off, from the
same gprune.zarr, and evaluates perplexity only (no lm-eval task) into
artifacts/diagnostics/gprune_<variant>-<sparsity>.metrics.json.

Measured on the default model at 30% (docs/results.md, "Method × sparsity"): before the switch became a
test against independent rankings (gprune.min_tau_z), with robust modules ranked by the dense model's
static scores, default 7,746 / no_switch 913 / neither 1,001; now no module switches there, so
no_switch is the default (700.2) and neither is no_module_sparsity (750.2). With every module at the
block's sparsity, the only difference from wanda_sp (343.8) is that neurons compete inside their
module, not across the layer.

    python studies/diagnostics/gprune_ablation.py 0.3 [variant ...]   # variants: no_switch, no_module_sparsity, neither
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import fang.methods.gprune as gp  # noqa: E402

VARIANTS = ("no_switch", "no_module_sparsity", "neither")
ORIGINAL = gp.load_gprune_inputs  # captured once: each variant patches the module attribute again


def variant_loader(variant: str):
    def load(art, params_path="params.yaml"):
        inputs = ORIGINAL(art, params_path)
        if variant in ("no_switch", "neither"):  # every module ranks by the activation metric
            inputs = dataclasses.replace(inputs, switched=torch.zeros_like(inputs.switched))
        if variant in ("no_module_sparsity", "neither"):  # every module of a block at the block's sparsity
            inputs = dataclasses.replace(inputs, module_gamma=0.0)
        return inputs

    return load


def main() -> None:
    import stages.evaluate
    import stages.prune

    sparsity = float(sys.argv[1])
    for variant in sys.argv[2:] or VARIANTS:
        assert variant in VARIANTS, variant
        gp.load_gprune_inputs = variant_loader(variant)
        out = ROOT / "artifacts/diagnostics" / f"gprune_{variant}-{sparsity}"
        stages.prune.run(method="gprune", sparsity=sparsity, out=str(out))
        stages.evaluate.run(model_dir=str(out), out=f"{out}.metrics.json", task_limit=-1)


if __name__ == "__main__":
    main()
