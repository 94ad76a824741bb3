"""Greedy structured OBC (the FANG paper's Algorithm 1): remove one unit, compensate, update H^-1, rescore."""

from __future__ import annotations

from .obc import Obc


class ObcIter(Obc):
    iterative = True  # `obc.obc_prune_iterative` instead of the one-shot `obc.obc_prune`
