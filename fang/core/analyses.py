"""Analysis variants of the recipe study: knobs that change the analysis a recipe is pruned from.

A recipe ("o_fang+flap_search,tau=3") sets prune.* keys only, so it reuses the main pipeline's cached
analysis. Three of the study's knobs change that analysis instead, and an analysis variant names them
("k=4", "shared=2", "calib=128x512", or several joined by commas):

- ``k``: token clusters = functional groups per layer (cluster.k; paper: 7). New clusters, Taylor scores,
  groups and allocation; capture is reused.
- ``shared``: the shared neuron group's size over one functional group's (group.shared_ratio; paper: 1,
  m = n / (K + 1)). New groups only.
- ``calib``: calibration sequences x tokens (calibrate.n_samples x calibrate.seq_len; paper: 128 x 2048).
  Everything from the calibration set on.

A variant's artifacts live in artifacts/recipe/analysis/<name>/ and those it does not change are the main
pipeline's (`paths.calibration_artifacts(analysis=...)`), so a knob that does not touch capture never
reruns it. `fang recipe-analysis` builds one (the stages of `Analysis.stages`, each with its `analysis`
argument, which makes `load_block` apply the variant's keys); `fang prune --analysis` prunes from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import FangError, require

# what each knob sets (params block, key) and the first artifact it changes; every later one changes too
KNOBS: dict[str, tuple[str, str]] = {"calib": ("calibrate", "calib"), "k": ("cluster", "cluster"),
                                     "shared": ("group", "groups")}
# the analysis artifacts in pipeline order (fields of paths.CalibrationArtifacts); metrics/plots go with them
ORDER = ("calib", "capture", "cluster", "taylor", "groups", "allocate")
STAGE_OF = {"calib": "calibrate", "capture": "capture", "cluster": "cluster", "taylor": "taylor", "groups": "group",
            "allocate": "allocate"}  # the stage (stages/<name>.py) that writes each
DEPENDS_ON = {"calib": (), "capture": ("calib",), "cluster": ("capture",), "taylor": ("calib", "cluster", "capture"),
              "groups": ("taylor",), "allocate": ("capture", "taylor")}


def _value(key: str, text: str, spec: str) -> Any:
    if key == "calib":
        n, x, length = text.partition("x")
        require(x == "x" and n.isdigit() and length.isdigit() and int(n) > 0 and int(length) > 1,
                f"{spec!r}: calib={text!r} must be SEQUENCESxTOKENS, e.g. 128x2048")
        return (int(n), int(length))
    if key == "k":
        require(text.isdigit() and int(text) >= 2, f"{spec!r}: k={text!r} must be a whole number >= 2")
        return int(text)
    try:
        ratio = float(text)
    except ValueError:
        raise FangError(f"{spec!r}: shared={text!r} is not a number") from None
    require(ratio > 0.0, f"{spec!r}: shared={text!r} must be > 0")
    return ratio


def _text(key: str, value: Any) -> str:
    if key == "calib":
        return f"{value[0]}x{value[1]}"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Analysis:
    """One analysis variant: its settings in key order, so two spellings share one folder."""

    settings: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        return ",".join(f"{k}={_text(k, v)}" for k, v in self.settings)

    def owns(self) -> tuple[str, ...]:
        """The artifacts this variant builds itself (pipeline order); the others are the main pipeline's."""
        own = {KNOBS[k][1] for k, _ in self.settings}
        for artifact in ORDER:  # everything downstream of an owned artifact is owned too
            if any(d in own for d in DEPENDS_ON[artifact]):
                own.add(artifact)
        return tuple(a for a in ORDER if a in own)

    def stages(self) -> tuple[str, ...]:
        """The analysis stages that build this variant, in pipeline order (`fang recipe-analysis` runs them)."""
        return tuple(STAGE_OF[a] for a in self.owns())

    def overrides(self, block: str) -> dict[str, Any]:
        """The params keys of `block` this variant replaces."""
        out: dict[str, Any] = {}
        for key, value in self.settings:
            if KNOBS[key][0] != block:
                continue
            if key == "calib":
                out["n_samples"], out["seq_len"] = value
            elif key == "k":
                out["k"] = value
            else:
                out["shared_ratio"] = value
        return out

    def apply(self, block: str, params):
        """`params` (a dataclass of params block `block`) with this variant's keys, validated again."""
        changed = self.overrides(block)
        if not changed:
            return params
        params = dataclasses.replace(params, **changed)
        validate = getattr(params, "validate", None)
        if validate is not None:
            validate()
        return params


def parse_analysis(spec: str) -> Analysis:
    """`key=value[,key=value...]` with keys from KNOBS ("k=4", "calib=128x512,shared=2")."""
    require(bool(str(spec).strip()), "an analysis variant needs at least one key=value (k, shared or calib)")
    settings: dict[str, Any] = {}
    for part in str(spec).split(","):
        key, eq, text = part.partition("=")
        require(eq == "=" and key and text, f"analysis {spec!r}: {part!r} is not a key=value setting")
        require(key in KNOBS, f"analysis {spec!r}: {key!r} is not an analysis knob; use one of {', '.join(KNOBS)}")
        require(key not in settings, f"analysis {spec!r} sets {key} twice")
        settings[key] = _value(key, text, spec)
    return Analysis(tuple(sorted(settings.items())))

