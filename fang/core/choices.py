"""The names params.yaml accepts for pruning: methods, allocations, compensations, and variants.

Kept apart from the pruning code so that validating params.yaml (every stage does) does not import
the pruning algorithms, and a change to them does not look like a change to every stage: the methods
and what each accepts come from the declarative registry (`fang.core.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FangError, require
from .registry import REGISTRY, method_spec

METHODS = tuple(REGISTRY)
# How each block's keep counts are chosen. auto = what each method's paper used (its registry line):
# FLAP's global search for flap, FANG's adaptive allocation (allocate.mode, paper: fc) for
# f_fang/o_fang, the same sparsity in every block for the rest. Any choice works with any method
# whose registry line does not fix its own allocation.
ALLOCATIONS = ("auto", "uniform", "fc", "taylor", "flap_search")
# Refits a method may offer (registry `compensations`): O-FANG's per functional group (paper, Eq. 7)
# or over the whole layer (OBC)
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
    named take the given defaults (the prune.* keys).

    The grammar is strict: each part at most once and in that order, no empty part. A variant is a
    sweep row's name and its output folder's: "obc+fc+uniform" or "o_fang+group+layer" used to run
    the last part silently under a name that says something else.
    """
    spec = str(spec)
    require(spec.strip() != "", f"the method is empty: give one of {', '.join(REGISTRY)} "
                                "(or a variant method[+allocation][+compensation])")
    method, *rest = spec.split("+")
    require(method in REGISTRY, f"unknown method {method!r} in {spec!r}; available: {', '.join(REGISTRY)}")
    require(all(rest), f"{spec!r} has an empty part (a '++' or a trailing '+'): write method[+allocation][+compensation]")
    m = method_spec(method)
    if not m.compensations:
        compensation = "group"  # prune.compensation is for methods with a choice of refit: the others ignore it
    if m.fixed_allocation:
        allocation = "auto"  # prune.allocation does not apply to a method that chooses its keep counts itself
    named_allocation = named_compensation = None
    for part in rest:
        if part in ALLOCATIONS:
            require(named_allocation is None, f"{spec!r} names two allocations ({named_allocation}, {part}): "
                                              "give at most one, as method[+allocation][+compensation]")
            require(named_compensation is None, f"{spec!r}: the allocation {part!r} comes after the compensation "
                                                f"{named_compensation!r}; write {method}+{part}+{named_compensation}")
            require(not m.fixed_allocation or part == "auto",
                    f"{spec!r}: {method} chooses its keep counts itself ({m.allocation}); it takes no allocation")
            allocation = named_allocation = part
        elif part in COMPENSATIONS:
            require(named_compensation is None, f"{spec!r} names two compensations ({named_compensation}, {part}): "
                                                "give at most one, as method[+allocation][+compensation]")
            compensation = named_compensation = part
        else:
            raise FangError(
                f"{spec!r}: {part!r} is neither an allocation ({', '.join(ALLOCATIONS)}) "
                f"nor a compensation ({', '.join(COMPENSATIONS)})"
            )
    offered = [n for n, s in REGISTRY.items() if s.compensations]
    require(
        compensation == "group" or compensation in m.compensations,
        f"{spec!r}: compensation {compensation!r} applies to {', '.join(offered)} only "
        "(the other methods have one refit)",
    )
    return Variant(method, allocation, compensation)


def resolve_allocation(method: str, allocation: str) -> str:
    """The concrete allocation `auto` stands for with `method` (its registry line: FANG's is its
    allocate.mode, "asa"; flap's its global search, "flap_search")."""
    require(allocation in ALLOCATIONS, f"prune.allocation={allocation!r}: use one of {', '.join(ALLOCATIONS)}")
    m = method_spec(method)
    require(not m.fixed_allocation or allocation == "auto",
            f"prune.allocation={allocation!r}: {method} chooses its keep counts itself ({m.allocation})")
    return m.allocation if allocation == "auto" else allocation
