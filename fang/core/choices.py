"""The names params.yaml accepts for pruning: methods, allocations, compensations, and variants.

Kept apart from the pruning code so that validating params.yaml (every stage does) does not import
the pruning algorithms, and a change to them does not look like a change to every stage: the methods
and what each accepts come from the declarative registry (`fang.core.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .errors import FangError, require
from .registry import EVERY_METHOD, REGISTRY, method_spec

METHODS = tuple(REGISTRY)
# How each block's keep counts are chosen. auto = what each method's paper used (its registry line):
# FLAP's global search for flap, FANG's adaptive allocation (allocate.mode, paper: fc) for
# f_fang/o_fang, the same sparsity in every block for the rest. Any choice works with any method
# whose registry line does not fix its own allocation.
ALLOCATIONS = ("auto", "uniform", "fc", "taylor", "flap_search")
# ... plus those one method computes itself (its registry line's `own_allocations`, e.g. sobp's first_order_split)
OWN_ALLOCATIONS = tuple(dict.fromkeys(a for s in REGISTRY.values() for a in s.own_allocations))


def allocations_for(method: str) -> tuple[str, ...]:
    """The prune.allocation values `method` accepts: the shared ones and its own."""
    return ALLOCATIONS + method_spec(method).own_allocations

# Refits a method may offer (registry `compensations`): O-FANG's per functional group (paper, Eq. 7),
# over the whole layer (OBC), or over the whole layer towards the dense model's output (ours, `dense_target`)
COMPENSATIONS = ("group", "layer", "dense")


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
        if part in allocations_for(method):
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
                f"{spec!r}: {part!r} is neither an allocation of {method} ({', '.join(allocations_for(method))}) "
                f"nor a compensation ({', '.join(COMPENSATIONS)})"
            )
    offered = [n for n, s in REGISTRY.items() if compensation in s.compensations]  # who offers this refit
    require(
        compensation == "group" or compensation in m.compensations,
        f"{spec!r}: compensation {compensation!r} applies to {', '.join(offered)} only "
        "(the other methods have one refit)",
    )
    return Variant(method, allocation, compensation)


def resolve_allocation(method: str, allocation: str) -> str:
    """The concrete allocation `auto` stands for with `method` (its registry line: FANG's is its
    allocate.mode, "asa"; flap's its global search, "flap_search")."""
    m = method_spec(method)
    require(allocation in allocations_for(method),
            f"prune.allocation={allocation!r}: {method} takes one of {', '.join(allocations_for(method))}")
    require(not m.fixed_allocation or allocation == "auto",
            f"prune.allocation={allocation!r}: {method} chooses its keep counts itself ({m.allocation})")
    return m.allocation if allocation == "auto" else allocation


# prune.* keys a recipe may set after its variant ("o_fang+layer,tau=3"): FANG's and OBC's numeric and
# switch knobs, and the FFN width alignment. Each is accepted only for a method whose registry line reads it
# (or that every method reads, EVERY_METHOD), so a recipe never names a setting its method would silently ignore.
RECIPE_KEYS: dict[str, type] = {"tau": float, "damp": float, "reweighting": str, "shared_group": bool,
                                "function_aware": bool, "align": int}


def _setting_value(key: str, text: str, spec: str) -> Any:
    kind = RECIPE_KEYS[key]
    if kind is bool:
        require(text in ("true", "false"), f"{spec!r}: {key}={text!r} must be true or false")
        return text == "true"
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise FangError(f"{spec!r}: {key}={text!r} is not a number") from None
    if kind is int:
        require(text.isdigit(), f"{spec!r}: {key}={text!r} is not a whole number")
        return int(text)
    return text


def _setting_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class Recipe:
    """A variant with prune.* settings of its own: one candidate of the recipe study
    ("o_fang+flap_search+layer,tau=3"). Its name is canonical (settings in key order), so two
    spellings of the same recipe share one output folder."""

    variant: Variant
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return ",".join([self.variant.name] + [f"{k}={_setting_text(v)}" for k, v in self.settings])

    def apply(self, params):
        """`params` (a PruneParams) with this recipe's method, allocation, compensation and settings."""
        v = self.variant
        return replace(params, method=v.method, allocation=v.allocation, compensation=v.compensation,
                       **dict(self.settings))


def parse_recipe(spec: str, allocation: str = "auto", compensation: str = "group") -> Recipe:
    """`method[+allocation][+compensation][,key=value...]` with keys from RECIPE_KEYS, e.g.
    "o_fang+layer,tau=3" or "f_fang,reweighting=uniform". A key its method does not read, a key
    given twice, or a malformed setting is a one-line error."""
    head, *parts = str(spec).split(",")
    variant = parse_variant(head, allocation, compensation)
    reads = method_spec(variant.method).reads
    settings: dict[str, Any] = {}
    for part in parts:
        key, eq, text = part.partition("=")
        require(eq == "=" and key and text, f"{spec!r}: {part!r} is not a key=value setting")
        require(key in RECIPE_KEYS, f"{spec!r}: {key!r} cannot be set in a recipe; use one of {', '.join(RECIPE_KEYS)}")
        require(key in reads or key in EVERY_METHOD, f"{spec!r}: {variant.method} does not read prune.{key}")
        require(key not in settings, f"{spec!r} sets {key} twice")
        settings[key] = _setting_value(key, text, spec)
    return Recipe(variant, tuple(sorted(settings.items())))
