"""The registry of pruning methods: one line per method, what params.yaml accepts and what each method reads.

A line is declarative (no torch, no pruning code), so validating params.yaml and writing a study
cell's manifest (`fang.methods.inputs`) never import the algorithms, and a change to one method does
not look like a change to every stage. The implementation is the class `impl` names in
`fang/methods/<module>.py`; the driver (`fang.methods.driver.method_class`) imports it by name. It lives in
the core, below the methods, so that validating params.yaml (`fang.core.choices`) reads it without an
import running upward.

Adding a method: write `fang/methods/<name>.py` with a `PruningMethod` subclass (`fang.methods.base`)
and add its `MethodSpec` line to `REGISTRY` below (this file, fang/core/registry.py). Nothing else changes: prune.method, the sweep and
bias-study rows, `fang method-inputs` manifests and the report's pairing all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FangError

# The analysis artifacts a method can read (fields of `fang.core.paths.CalibrationArtifacts`).
ARTIFACTS = ("cluster", "taylor", "groups", "allocate", "ica", "gprune")
# prune keys every method reads besides its own `reads`: prune.align rounds the kept FFN widths of every method
# (fang.methods.plan.align_widths)
EVERY_METHOD = ("align",)
_FANG_KEYS = ("tau", "shared_group", "function_aware", "reweighting")
_FANG_ARTIFACTS = ("cluster", "taylor", "groups", "allocate")


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    name: the prune.method value. impl: "module:Class" under fang.methods.
    reads: the prune.* keys it reads (besides method, sparsity, allocation, compensation).
    artifacts: the analysis artifacts it reads (ARTIFACTS), besides the model and the capture.
    params: keys of other params.yaml blocks it reads at prune time ("gprune.module_gamma").
    allocation: what prune.allocation `auto` means for it: one of fang.core.choices.ALLOCATIONS, or a name of
      its own ("asa": FANG's allocated block sparsity; "ica_threshold": one global ICA threshold).
    fixed_allocation: it chooses its keep counts itself and accepts no other allocation.
    own_allocations: further allocations of its own a variant may name (`method+name`), besides the shared
      ones (fang.core.choices.ALLOCATIONS); the method's `plan` computes them.
    compensations: the choices of refit prune.compensation offers it (first = default); () = one refit.
    baseline: the method the report pairs it with (same heads, compensation and allocation family).
    """

    name: str
    impl: str
    reads: tuple[str, ...]
    artifacts: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    allocation: str = "uniform"
    fixed_allocation: bool = False
    own_allocations: tuple[str, ...] = ()
    compensations: tuple[str, ...] = ()
    baseline: str | None = None

    @property
    def module(self) -> str:
        return self.impl.partition(":")[0]

    @property
    def cls(self) -> str:
        return self.impl.partition(":")[2]


REGISTRY: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("flap", "flap:Flap", ("gqa", "batch_size"), allocation="flap_search"),
    MethodSpec("wanda_sp", "wanda_sp:WandaSp", ("gqa", "batch_size")),
    MethodSpec("magnitude", "magnitude:Magnitude", ("gqa",)),
    MethodSpec("obc", "obc:Obc", ("gqa", "batch_size", "damp")),
    MethodSpec("obc_iter", "obc_iter:ObcIter", ("gqa", "batch_size", "damp")),
    MethodSpec("f_fang", "f_fang:FFang", ("gqa", "batch_size", *_FANG_KEYS), _FANG_ARTIFACTS, allocation="asa",
               baseline="flap"),
    MethodSpec("o_fang", "o_fang:OFang", ("gqa", "batch_size", "damp", *_FANG_KEYS), _FANG_ARTIFACTS,
               allocation="asa", compensations=("group", "layer", "dense"), baseline="obc"),
    MethodSpec("ica_fn", "ica_fn:IcaFaithful", ("batch_size",), ("ica",), allocation="ica_threshold",
               fixed_allocation=True, baseline="flap"),
    MethodSpec("ica_fn_ranked", "ica_fn:IcaRanked", ("gqa", "batch_size"), ("ica",), baseline="flap"),
    # SoBP (Wei et al., EMNLP 2024): its `auto` allocation is its own global first-order ranking
    # (sobp+first_order_split: the same ranking, pooled per module type, docs/methods.md "SoBP");
    # compensation: its default is step 3 (module-wise, to the dense outputs); sobp+layer refits to each layer's own
    MethodSpec("sobp", "sobp:Sobp", ("gqa", "batch_size", "damp"), allocation="first_order",
               own_allocations=("first_order_split",), compensations=("group", "layer"), baseline="obc"),
    MethodSpec("gprune", "gprune:GPrune", ("gqa", "batch_size"), ("gprune",),
               params=("gprune.module_gamma", "gprune.max_sparsity"), baseline="wanda_sp"),
)}


def method_spec(name: str) -> MethodSpec:
    spec = REGISTRY.get(name)
    if spec is None:
        raise FangError(f"unknown prune.method {name!r}; available: {', '.join(REGISTRY)}")
    return spec
