"""O-FANG: function-aware FFN pruning on structured OBC (per-group reweighted Hessians, Eq. 11, and the
group-wise refit of Eq. 7 or a whole-layer refit, `prune.compensation`); heads by one-shot OBC.
The machinery is `fang.methods.function_aware`."""

from __future__ import annotations

from .function_aware import FunctionAware


class OFang(FunctionAware):
    base = "obc"
