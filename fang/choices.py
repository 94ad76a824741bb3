"""The names params.yaml accepts for pruning: methods, allocations, compensations.

Kept apart from the pruning code so that validating params.yaml (every stage does) does not import
the pruning algorithms, and a change to them does not look like a change to every stage.
"""

METHODS = ("flap", "wanda_sp", "magnitude", "obc", "obc_iter", "f_fang", "o_fang")
# FANG method -> base method used for attention heads (and for the FFN inside each group)
FANG_BASE = {"f_fang": "flap", "o_fang": "obc"}
# How each block's keep counts are chosen. auto = what each method's paper used: FLAP's global
# search for flap, FANG's adaptive allocation (allocate.mode, paper: fc) for f_fang/o_fang, the
# same sparsity in every block for the rest. Any choice works with any method.
ALLOCATIONS = ("auto", "uniform", "fc", "taylor", "flap_search")
# O-FANG's refit of the kept neurons: per functional group (paper, Eq. 7) or the whole layer (OBC)
COMPENSATIONS = ("group", "layer")
