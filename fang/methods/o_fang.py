"""O-FANG: function-aware FFN pruning on structured OBC (per-group reweighted Hessians, Eq. 11, and the
group-wise refit of Eq. 7, a whole-layer refit, or ours, a whole-layer refit towards the dense model's output,
`prune.compensation`); heads by one-shot OBC (with `dense`: on the dense-target weight, `dense_target`).
The machinery is `fang.methods.function_aware`."""

from __future__ import annotations

from .function_aware import FunctionAware


class OFang(FunctionAware):
    base = "obc"
