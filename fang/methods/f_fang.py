"""F-FANG: function-aware FFN pruning on FLAP (token-reweighted fluctuation per functional group, Eq. 15,
one bias compensation per layer, Eq. 13); heads by FLAP. The machinery is `fang.methods.function_aware`."""

from __future__ import annotations

from .function_aware import FunctionAware


class FFang(FunctionAware):
    base = "flap"
