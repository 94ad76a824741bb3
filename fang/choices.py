"""The names params.yaml accepts for pruning: methods, allocations, compensations, and variants.

Kept apart from the pruning code so that validating params.yaml (every stage does) does not import
the pruning algorithms, and a change to them does not look like a change to every stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FangError, require

METHODS = ("flap", "wanda_sp", "magnitude", "obc", "obc_iter", "f_fang", "o_fang")
# FANG method -> base method used for attention heads (and for the FFN inside each group)
FANG_BASE = {"f_fang": "flap", "o_fang": "obc"}
# How each block's keep counts are chosen. auto = what each method's paper used: FLAP's global
# search for flap, FANG's adaptive allocation (allocate.mode, paper: fc) for f_fang/o_fang, the
# same sparsity in every block for the rest. Any choice works with any method.
ALLOCATIONS = ("auto", "uniform", "fc", "taylor", "flap_search")
# O-FANG's refit of the kept neurons: per functional group (paper, Eq. 7) or the whole layer (OBC)
COMPENSATIONS = ("group", "layer")


@dataclass(frozen=True)
class Variant:
    """A method with its allocation and compensation: one row of the sweep ("obc+fc", "o_fang+layer")."""

    method: str
    allocation: str = "auto"
    compensation: str = "group"

    @property
    def name(self) -> str:
        parts = [self.method]
        if self.allocation != "auto":
            parts.append(self.allocation)
        if self.compensation != "group":
            parts.append(self.compensation)
        return "+".join(parts)


def parse_variant(spec: str, allocation: str = "auto", compensation: str = "group") -> Variant:
    """`method[+allocation][+compensation]`, e.g. "obc+fc", "flap+uniform", "o_fang+layer"; parts not
    named take the given defaults (the prune.* keys)."""
    method, *rest = str(spec).split("+")
    require(method in METHODS, f"unknown method {method!r} in {spec!r}; available: {', '.join(METHODS)}")
    if method != "o_fang":
        compensation = "group"  # prune.compensation is O-FANG's key: the other methods ignore it
    for part in rest:
        if part in ALLOCATIONS:
            allocation = part
        elif part in COMPENSATIONS:
            compensation = part
        else:
            raise FangError(
                f"{spec!r}: {part!r} is neither an allocation ({', '.join(ALLOCATIONS)}) "
                f"nor a compensation ({', '.join(COMPENSATIONS)})"
            )
    require(
        compensation == "group" or method == "o_fang",
        f"{spec!r}: compensation {compensation!r} applies to o_fang only (the other methods have one refit)",
    )
    return Variant(method, allocation, compensation)


def resolve_allocation(method: str, allocation: str) -> str:
    """The concrete allocation `auto` stands for with `method` (FANG's is its allocate.mode: "asa")."""
    require(allocation in ALLOCATIONS, f"prune.allocation={allocation!r}: use one of {', '.join(ALLOCATIONS)}")
    if allocation != "auto":
        return allocation
    if method == "flap":
        return "flap_search"
    return "asa" if method in FANG_BASE else "uniform"
