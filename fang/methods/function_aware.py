"""Function-aware FFN pruning (FANG): group-wise, token-reweighted FLAP and OBC for down_proj's input.

Per decoder block l (paper: "Function-Aware Pruning Strategy", Appendix Eq. 11, 13, 15):

1. Every calibration token is labelled with a context cluster j by projecting its FFN input with
   the stored PCA and taking the nearest stored centroid (`label_tokens`).
2. down_proj's input columns (neurons) are split into the k functional groups G_0..G_{k-1} and the
   shared group (`FangInputs.neuron_groups`, value k). The shared group is never pruned when
   `shared_group` is on; otherwise it is one more group, pruned at the same rate as the others.
3. Each group is pruned on its own to the block's FFN sparsity (`group_removal_counts`), using
   statistics in which token cluster j counts with weight alpha[g, j] (Eq. 6, `relevance_weights`):
   - FLAP (Eq. 15): S_i = sum_j alpha_gj sum_{t in C_j} (x_it - mean_i)^2 * ||W[:, i]||^2, with the
     plain mean over all tokens; then one bias compensation for the layer with the plain mean (Eq. 13).
   - OBC (Eq. 11): H_g = sum_j alpha_gj X_{G_g, C_j} X_{G_g, C_j}^T (the group's columns only), then
     one-shot OBC inside the group (Eq. 9, 10) with H_g.
4. `function_aware=False` keeps step 2's shared-group exemption but prunes the rest of the layer as
   one unit with plain statistics (the Table 5 rows without FAP).

O-FANG's refit of the kept neurons (`prune.compensation`): `group` (the paper's, below), `layer` (the
plain layer Hessian over all kept columns, OBC's), or `dense` (ours): as `layer`, but towards the dense
model's down_proj output on the pruned inputs, and heads by one-shot OBC on o_proj's dense-target weight
(`fang.methods.dense_target`, shared with SoBP's module-wise reconstruction). The neurons are the same
group-wise choice in all three.

Group-wise OBC compensation. The objective of Eq. 7 is a sum over groups, each term
sum_j alpha_gj ||(W - W')_{:, G_g} X_{G_g, C_j}||^2 = tr((W - W')_{:, G_g} H_g (W - W')_{:, G_g}^T),
which involves only that group's columns. So the optimum decouples: each group's removed columns
are compensated by refitting the kept columns *of the same group* by weighted least squares
(Eq. 10 with H_g^-1), and the shared group is left untouched. The layer's update is the sum of the
per-group updates (they touch disjoint columns), applied at once.

Memory: only |G_g| x |G_g| Hessians per group are accumulated (sum over groups is about
n_ffn^2 / (k + 1) doubles, not k full n_ffn x n_ffn matrices).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..analysis.allocate import AllocationScores, read_allocation_scores
from ..analysis.cluster import assign_clusters, relevance_weights
from ..analysis.store import open_store
from ..core.errors import FangError, require
from ..core.paths import CalibrationArtifacts
from ..core.progress import warn
from ..model.modeling import decoder_layers
from .base import LayerContext, PruningMethod, Selection, UnitPruner, select_top
from .dense_target import CrossMoment, DenseStream, DenseTargetPruner, capture_token_ids, check_token_ids, module_target_weight
from .flap import bias_compensation, flap_pruner
from .obc import HessianAccumulator, ObcPruner, inverse_hessian, obc_compensate, obc_prune
from .stats import InputStats

FIELDS = ("pca_mean", "pca_components", "centroids", "center_distances", "neuron_groups")


def _tensor(value, name: str) -> Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise FangError(f"FangInputs.{name} is not array-like: {exc}") from None


@dataclass
class FangInputs:
    """Per-layer products of the analysis stages that FANG prunes with (tensors or numpy arrays).

    pca_mean [L, d], pca_components [L, p, d], centroids [L, k, p]: the context clustering
    (stage `cluster`) used to label tokens during pruning.
    center_distances [L, k, k]: distances between cluster centres at down_proj's input (Eq. 6's D).
    neuron_groups [L, n_ffn] int: 0..k-1 = functional group of that token cluster, k = shared group.
    allocation: the allocation stage's block scores (allocate.json), from which the plan computes each block's
    sparsity at the target (FANG's own allocation, "asa": `plan.allocated_sparsity`); or, instead,
    sparsity [L]: a block sparsity given as is, whatever the target (heads and FFN use the same value).
    token_ids [N, L] long, optional: the calibration token ids the driver prunes on (the capture's), read
    only for O-FANG's dense-target refit (prune.compensation: dense), whose dense stream runs them in
    batches of `batch_size` (prune.batch_size).
    """

    pca_mean: Tensor
    pca_components: Tensor
    centroids: Tensor
    center_distances: Tensor
    neuron_groups: Tensor
    sparsity: Tensor | None = None
    allocation: AllocationScores | None = None
    token_ids: Tensor | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in FIELDS:
            setattr(self, name, _tensor(getattr(self, name), name))
        for name in FIELDS[:4]:
            setattr(self, name, getattr(self, name).float())
        self.neuron_groups = self.neuron_groups.long()
        if self.sparsity is not None:
            self.sparsity = _tensor(self.sparsity, "sparsity").double().reshape(-1)
        if self.token_ids is not None:
            self.token_ids = _tensor(self.token_ids, "token_ids").long()

    @property
    def k(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def n_layers(self) -> int:
        return int(self.centroids.shape[0])

    def validate(self, n_layers: int, hidden: int, n_ffn: int) -> None:
        """Shapes and values against the model being pruned; FangError naming the offending array."""
        shapes = {
            "pca_mean": (2, self.pca_mean.shape),
            "pca_components": (3, self.pca_components.shape),
            "centroids": (3, self.centroids.shape),
            "center_distances": (3, self.center_distances.shape),
            "neuron_groups": (2, self.neuron_groups.shape),
        }
        for name, (dims, shape) in shapes.items():
            require(len(shape) == dims, f"FangInputs.{name} must have {dims} dimensions, got shape {tuple(shape)}")
            require(shape[0] == n_layers, f"FangInputs.{name} has {shape[0]} layers, the model has {n_layers}")
        require((self.sparsity is None) != (self.allocation is None),
                "FangInputs needs one block allocation: `allocation` (the allocate stage's scores) or `sparsity` "
                "(given per block)")
        if self.sparsity is not None:
            n_s = self.sparsity.numel()
            require(n_s == n_layers, f"FangInputs.sparsity has {n_s} layers, the model has {n_layers}")
        else:
            n_s = len(self.allocation.scores)
            require(n_s == n_layers, f"FangInputs.allocation ({self.allocation.source}) scores {n_s} blocks, the model "
                                     f"has {n_layers}")
        p, k = self.pca_components.shape[1], self.k
        d_mean, d_comp = self.pca_mean.shape[1], self.pca_components.shape[2]
        require(d_mean == hidden, f"FangInputs.pca_mean has d={d_mean}, the model hidden size is {hidden}")
        require(d_comp == hidden, f"FangInputs.pca_components map from d={d_comp}, the model hidden size is {hidden}")
        p_c = self.centroids.shape[2]
        require(p_c == p, f"FangInputs.centroids live in {p_c} dims, the PCA gives {p}")
        require(k >= 1, "FangInputs.centroids has no clusters (k = 0)")
        d_shape = tuple(self.center_distances.shape[1:])
        require(
            d_shape == (k, k),
            f"FangInputs.center_distances is {d_shape} per layer, expected ({k}, {k}) for k={k} clusters",
        )
        n_g = self.neuron_groups.shape[1]
        require(n_g == n_ffn, f"FangInputs.neuron_groups has {n_g} neurons per layer, the model's FFN has {n_ffn}")
        for name in FIELDS[:4]:
            require(bool(torch.isfinite(getattr(self, name)).all()), f"FangInputs.{name} contains NaN or Inf")
        g = self.neuron_groups
        lo, hi = int(g.min()), int(g.max())
        require(
            lo >= 0 and hi <= k,
            f"FangInputs.neuron_groups uses group ids {lo}..{hi} but the centroids have k={k} clusters: "
            f"expected 0..{k - 1} for functional groups and {k} for the shared group (were they built with another k?)",
        )
        no_shared = [li for li in range(n_layers) if not bool((g[li] == k).any())]
        require(
            not no_shared,
            f"FangInputs.neuron_groups: layers {no_shared} have no neuron with the shared id {k}; the groups do not "
            f"match the centroids' k={k} (the shared group must be id k)",
        )
        s = self.sparsity
        require(s is None or (bool(torch.isfinite(s).all()) and bool(((s >= 0) & (s < 1)).all())),
                f"FangInputs.sparsity must be in [0, 1) per layer, got {None if s is None else s.tolist()}")
        if self.token_ids is not None:
            t = self.token_ids
            require(t.dim() == 2 and t.numel() > 0, f"FangInputs.token_ids must be [N, L], got {tuple(t.shape)}")
            require(self.batch_size > 0, f"FangInputs.batch_size={self.batch_size} must be positive")


def label_tokens(ffn_in: Tensor, inputs: FangInputs, layer: int) -> Tensor:
    """Context cluster of every token of an FFN input [..., d] in `layer` -> [n_tokens] long."""
    x = ffn_in.detach().reshape(-1, ffn_in.shape[-1])
    return assign_clusters(x, inputs.pca_mean[layer], inputs.pca_components[layer], inputs.centroids[layer])


def group_removal_counts(sizes: Sequence[int], n_remove: int) -> list[int]:
    """Neurons each group loses so that the total is `n_remove` and every group keeps at least one.

    All groups are pruned at one effective rate r = n_remove / sum(sizes) (with the shared group
    exempt, r is above the block sparsity, so the layer still loses n_remove neurons). Group g's
    quota r * |G_g| is rounded by largest remainder: floors first, then the leftover neurons go to
    the largest fractional parts (ties to the lower group index), which hits the total exactly
    and leaves every group within one neuron of its quota. A group whose quota would empty it is
    clamped to |G_g| - 1 and the rate is recomputed for the others; if even that cannot reach
    `n_remove`, every group keeps exactly one neuron. Empty groups lose nothing.
    """
    sizes = [int(s) for s in sizes]
    require(all(s >= 0 for s in sizes), f"group sizes must be >= 0, got {sizes}")
    require(n_remove >= 0, f"n_remove={n_remove} must be >= 0")
    caps = [max(s - 1, 0) for s in sizes]
    counts = [0] * len(sizes)
    remaining = min(int(n_remove), sum(caps))
    active = [i for i, c in enumerate(caps) if c > 0]
    while remaining > 0 and active:
        rate = remaining / sum(sizes[i] for i in active)
        full = [i for i in active if rate * sizes[i] >= caps[i]]
        if full:  # these hit their cap; the rest share what is left at a higher rate
            for i in full:
                counts[i] = caps[i]
                remaining -= caps[i]
            active = [i for i in active if i not in full]
            continue
        quota = {i: rate * sizes[i] for i in active}
        base = {i: math.floor(quota[i]) for i in active}
        left = remaining - sum(base.values())
        for i in sorted(active, key=lambda i: (-(quota[i] - base[i]), i))[:left]:
            base[i] += 1
        for i in active:
            counts[i] = base[i]
        remaining = 0
    return counts


@dataclass
class FfnGroup:
    """One independently pruned set of down_proj input columns."""

    name: str  # "group 3", "shared" or "layer" (ungrouped)
    columns: Tensor  # [m] column ids, ascending
    removable: Tensor  # [m] bool: False for shared neurons that an ungrouped prune must keep
    alpha: Tensor  # [k] float64 weight of each token cluster in this group's statistics
    n_remove: int


def plan_groups(
    group_ids: Tensor,
    k: int,
    alpha: Tensor,
    n_remove: int,
    shared_group: bool = True,
    function_aware: bool = True,
) -> list[FfnGroup]:
    """Split one layer's neurons into the groups that are pruned independently, with their counts.

    function_aware: the k functional groups (token weights = row g of alpha) and, when the shared
    group is not exempt, the shared group as one more group with uniform weights 1/k (it serves
    every context, so no cluster is preferred). Otherwise one group holding the whole layer with
    plain statistics (every token weight 1); the shared neurons stay in it as non-removable
    columns when exempt, so compensation can still use them.
    """
    group_ids = group_ids.detach().long().cpu().reshape(-1)
    alpha = alpha.detach().double().cpu()
    require(alpha.shape == (k, k), f"alpha must be [{k}, {k}], got {tuple(alpha.shape)}")
    shared = group_ids == k
    if not function_aware:
        cols = torch.arange(group_ids.numel())
        removable = ~shared if shared_group else torch.ones_like(shared)
        n_ok = int(removable.sum())
        cap = n_ok if n_ok < cols.numel() else n_ok - 1  # a fully removable layer keeps one neuron
        return [FfnGroup("layer", cols, removable, torch.ones(k, dtype=torch.float64), min(n_remove, max(cap, 0)))]
    groups = [(f"group {g}", torch.nonzero(group_ids == g).reshape(-1), alpha[g]) for g in range(k)]
    if not shared_group:
        groups.append(("shared", torch.nonzero(shared).reshape(-1), torch.full((k,), 1.0 / k, dtype=torch.float64)))
    counts = group_removal_counts([c.numel() for _, c, _ in groups], n_remove)
    return [
        FfnGroup(name, cols, torch.ones(cols.numel(), dtype=torch.bool), a, n)
        for (name, cols, a), n in zip(groups, counts)
    ]


class ClusterMoments:
    """Per-token-cluster mean and squared deviations of one Linear input (one `stats.InputStats` each).

    Keeping the clusters apart lets any token weighting alpha be applied afterwards, and gives the
    plain statistics by merging; Chan-style merging avoids raw sums of squares (see stats.InputStats).
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.stats = [InputStats() for _ in range(k)]

    def add_batch(self, x: Tensor, labels: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        labels = labels.reshape(-1).to(x.device)
        require(labels.numel() == x.shape[0], f"ClusterMoments: {labels.numel()} labels for {x.shape[0]} tokens")
        for c in torch.unique(labels).tolist():
            self.stats[int(c)].add_batch(x[labels == c])

    @property
    def counts(self) -> Tensor:
        return torch.tensor([s.count for s in self.stats], dtype=torch.float64)

    def total(self) -> InputStats:
        merged = InputStats()
        for s in self.stats:
            merged.merge(s)
        return merged

    def deviation_sums(self, center: Tensor) -> Tensor:
        """[k, C]: sum over tokens of cluster j of (x - center)^2 = m2_j + n_j (mean_j - center)^2."""
        center = center.detach().to(torch.float64)
        out = torch.zeros(self.k, center.numel(), dtype=torch.float64, device=center.device)
        for j, s in enumerate(self.stats):
            if s.count == 0:
                continue
            m2 = s.variance.to(center.device) * s.weight_sum
            out[j] = m2 + s.weight_sum * (s.mean.to(center.device) - center).square()
        return out


def reweighted_fluctuation(weight: Tensor, deviation_sums: Tensor, alpha: Tensor) -> Tensor:
    """Eq. 15 for every column of `weight` [out, C]: (sum_j alpha_j dev[j]) * ||W[:, i]||^2 -> [C] float64."""
    require(
        deviation_sums.dim() == 2 and deviation_sums.shape[1] == weight.shape[1],
        f"reweighted_fluctuation: deviations {tuple(deviation_sums.shape)} for {weight.shape[1]} columns",
    )
    a = alpha.detach().to(device=deviation_sums.device, dtype=torch.float64)
    col_sq = torch.linalg.vector_norm(weight.detach(), dim=0, dtype=torch.float64).square()
    return (a @ deviation_sums) * col_sq.to(deviation_sums.device)


class GroupHessians:
    """H_g = sum_t alpha[g, cluster(t)] x_{G_g, t} x_{G_g, t}^T for each group (Eq. 11), streamed."""

    def __init__(self, groups: Sequence[FfnGroup], device: torch.device | str = "cpu") -> None:
        self.groups = list(groups)
        self.acc = [HessianAccumulator(g.columns.numel(), device) if g.columns.numel() else None for g in self.groups]

    def add_batch(self, x: Tensor, labels: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        labels = labels.reshape(-1).to(x.device)
        for g, acc in zip(self.groups, self.acc):
            if acc is None:
                continue
            a = g.alpha.to(x.device)
            # all-ones weights (ungrouped) are the plain Hessian: skip the per-token scaling
            w = None if bool((a == 1).all()) else a[labels]
            acc.add_batch(x[:, g.columns.to(x.device)], w)


class FangLayerPruner:
    """One block's function-aware FFN pruning with base method "flap" or "obc".

    OBC's refit of the kept neurons (`compensation`): "group", per functional group with its reweighted
    Hessian (Eq. 7); "layer", every kept column against the plain layer Hessian (OBC's Eq. 10); "dense"
    (ours), every kept column against the plain layer Hessian towards the *dense* model's down_proj output
    `targets` ([T, out], the driver's token order, `dense_target`): obc_compensate(W*, H^-1, removed).
    The neurons are chosen group-wise in all three.
    """

    def __init__(
        self,
        base: str,
        groups: Sequence[FfnGroup],
        group_ids: Tensor,
        k: int,
        damp: float = 0.01,
        where: str = "layer",
        device: torch.device | str = "cpu",
        compensation: str = "group",
        targets: Tensor | None = None,
    ) -> None:
        require(base in ("flap", "obc"), f"FANG base method must be 'flap' or 'obc', got {base!r}")
        require(compensation in ("group", "layer", "dense"),
                f"compensation={compensation!r}: use 'group', 'layer' or 'dense'")
        dense = base == "obc" and compensation == "dense"
        require(not dense or targets is not None,
                f"{where}: compensation=dense needs the dense model's down_proj outputs (targets)")
        self.base, self.k, self.damp, self.where = base, k, damp, where
        self.compensation = compensation
        self.groups = list(groups)
        self.group_ids = group_ids.detach().long().cpu().reshape(-1)
        self.n_channels = self.group_ids.numel()
        self.moments = ClusterMoments(k) if base == "flap" else None
        # Hessians only for groups that lose something: the others keep their weights as they are
        todo = [g for g in self.groups if g.n_remove > 0]
        self.hessians = GroupHessians(todo, device) if base == "obc" else None
        # compensation "layer": neurons are chosen group-wise (above), then every kept column of the
        # layer is refit against the plain, unweighted Hessian of the whole layer (OBC's Eq. 10);
        # "dense": the same refit towards the dense model's output, so even a block losing nothing is refit
        use_layer = base == "obc" and ((compensation == "layer" and bool(todo)) or dense)
        self.layer_hessian = HessianAccumulator(self.n_channels, device) if use_layer else None
        self.moment = CrossMoment(targets, where) if dense else None
        self.cluster_counts = torch.zeros(k, dtype=torch.long)

    def add_batch(self, x: Tensor, labels: Tensor) -> None:
        self.cluster_counts += torch.bincount(labels.reshape(-1).cpu(), minlength=self.k)
        if self.moments is not None:
            self.moments.add_batch(x, labels)
        if self.hessians is not None:
            self.hessians.add_batch(x, labels)
        if self.layer_hessian is not None:
            self.layer_hessian.add_batch(x)
        if self.moment is not None:
            self.moment.add_batch(x)

    def _group_has_tokens(self, g: FfnGroup) -> bool:
        return float(g.alpha @ self.cluster_counts.double()) > 0

    def select(self, weight: Tensor) -> Selection:
        """Kept neurons (ascending), with FLAP's bias or OBC's compensated weight, and per-group counts."""
        require(
            weight.shape[1] == self.n_channels,
            f"{self.where}: down_proj has {weight.shape[1]} inputs but the neuron groups cover {self.n_channels}",
        )
        w = weight.detach()
        pruned = torch.zeros(self.n_channels, dtype=torch.bool)
        no_tokens: list[str] = []
        new_w = None
        bias = None
        if self.base == "flap":
            plain = self.moments.total()
            mean = plain.mean.to(w.device)
            dev = self.moments.deviation_sums(mean)
            for g in self.groups:
                if g.n_remove == 0:
                    continue
                alpha = g.alpha
                if not self._group_has_tokens(g):
                    # no token of the clusters this group looks at: fall back to all tokens
                    no_tokens.append(g.name)
                    alpha = torch.ones(self.k, dtype=torch.float64)
                cols = g.columns.to(w.device)
                metric = reweighted_fluctuation(w[:, cols], dev[:, cols], alpha).cpu()
                if not bool(torch.isfinite(metric).all()):
                    raise FangError(f"{self.where} {g.name}: FLAP scores are not finite (NaN/Inf activations?)")
                metric = torch.where(g.removable, metric, torch.full_like(metric, float("inf")))
                keep_local = select_top(metric, g.columns.numel() - g.n_remove)
                gone = torch.ones(g.columns.numel(), dtype=torch.bool)
                gone[keep_local] = False
                pruned[g.columns[gone]] = True
            keep = torch.nonzero(~pruned).reshape(-1)
            bias = bias_compensation(w, mean, keep.to(w.device))  # Eq. 13 with the plain mean
        else:
            new_w = w.to(torch.float64).clone()
            for g, acc in zip(self.hessians.groups, self.hessians.acc):
                where = f"{self.where} {g.name}"
                cols = g.columns.to(w.device)
                if acc.weight_sum > 0:
                    hinv = inverse_hessian(acc.hessian, self.damp, where)
                else:
                    # no weighted token reached this group (e.g. only_matched with an empty cluster):
                    # nothing to fit, so rank by weight norm (OBC with H = I) and do not compensate
                    no_tokens.append(g.name)
                    hinv = torch.eye(cols.numel(), dtype=torch.float64, device=acc.hessian.device)
                keep_local, w_g = obc_prune(w[:, cols], hinv, g.n_remove, removable=g.removable, where=where)
                gone = torch.ones(g.columns.numel(), dtype=torch.bool)
                gone[keep_local] = False
                pruned[g.columns[gone]] = True
                new_w[:, cols] = w_g.to(device=new_w.device, dtype=new_w.dtype)
            keep = torch.nonzero(~pruned).reshape(-1)
            if self.layer_hessian is not None:
                h = self.layer_hessian.hessian
                hinv = inverse_hessian(h, self.damp, f"{self.where} ({self.compensation} compensation)")
                gone = torch.nonzero(pruned).reshape(-1)
                # dense: OBS on W* = argmin ||Y_dense - W X||^2 is the refit of the kept columns to Y_dense
                target = w if self.moment is None else module_target_weight(w, h, self.moment.mean(), hinv)
                new_w = obc_compensate(target, hinv, gone.to(hinv.device), self.where)
        ids = self.group_ids
        info = {
            "groups_removed": [int((pruned & (ids == g)).sum()) for g in range(self.k)],
            "group_sizes": [int((ids == g).sum()) for g in range(self.k)],
            "shared_removed": int((pruned & (ids == self.k)).sum()),
            "shared_size": int((ids == self.k).sum()),
            "token_clusters": self.cluster_counts.tolist(),
            "compensation": self.compensation if self.base == "obc" else "bias",
        }
        if no_tokens:
            info["groups_without_tokens"] = no_tokens
        return Selection(keep, weight=new_w, bias=bias, info=info)


# ---------------------------------------------------------------------------------------------- the methods


def load_fang_inputs(art: CalibrationArtifacts, token_ids: bool = False, batch_size: int = 8) -> FangInputs:
    """The analysis artifacts FANG prunes with, the allocation's block scores among them (whatever the target).
    `token_ids`: also the capture's calibration token ids (the dense-target refit's dense stream, run in
    batches of `batch_size`)."""
    clusters = open_store(art.cluster, "cluster", "cluster")
    taylor = open_store(art.taylor, "taylor", "taylor")
    groups = open_store(art.groups, "groups", "group")
    return FangInputs(
        pca_mean=clusters["pca_mean"][:],
        pca_components=clusters["pca_components"][:],
        centroids=clusters["centroids"][:],
        center_distances=taylor["center_distances"][:],
        neuron_groups=groups["neuron_groups"][:],
        allocation=read_allocation_scores(art.allocate),
        token_ids=capture_token_ids(art.capture) if token_ids else None,
        batch_size=batch_size,
    )


def own_cluster_weight(alpha: torch.Tensor, cluster_counts: torch.Tensor) -> list[float]:
    """Per functional group g: the share of its token weight that falls on its own cluster's tokens,
    alpha[g, g] n_g / sum_j alpha[g, j] n_j (1 = only its own contexts, 1/k = no preference)."""
    a = alpha.detach().double().cpu()
    n = cluster_counts.detach().double().cpu()
    mass = a * n[None, :]
    total = mass.sum(1)
    own = mass.diagonal()
    return [float(o / t) if t > 0 else float("nan") for o, t in zip(own, total)]


class FangFfnPruner:
    """`FangLayerPruner` on the driver's interface: labels each batch's tokens from the MLP input
    (`add_ffn_input`, called before the same batch's `add_batch` of down_proj's input)."""

    def __init__(self, inner: FangLayerPruner, inputs: FangInputs, layer: int) -> None:
        self.inner, self.inputs, self.layer = inner, inputs, layer
        self.labels: list[Tensor] = []

    def add_ffn_input(self, x: Tensor) -> None:
        self.labels.append(label_tokens(x, self.inputs, self.layer))

    def add_batch(self, x: Tensor) -> None:
        self.inner.add_batch(x, self.labels.pop())

    def select(self, weight: Tensor, n_keep: int, units: Tensor | None = None) -> Selection:
        return self.inner.select(weight)  # the groups' removal counts were planned for n_keep


class FunctionAware(PruningMethod):
    """FANG on a base method ("flap": F-FANG, "obc": O-FANG): heads by the base method at the block's
    sparsity, FFN neurons group-wise with token-reweighted statistics (`FangLayerPruner`)."""

    base: ClassVar[str]
    needs_ffn_input = True

    def __init__(self, name: str, options, inputs: FangInputs | None = None) -> None:
        super().__init__(name, options, inputs)
        self._alpha: dict[int, Tensor] = {}
        self._stream: DenseStream | None = None  # compensation dense: the dense model's stream, one block ahead
        self._mlp_targets: Tensor | None = None

    @property
    def dense_refit(self) -> bool:
        return self.options.compensation == "dense"

    @classmethod
    def load_inputs(cls, art: CalibrationArtifacts, params_path: str = "params.yaml", options=None) -> FangInputs:
        if options is None or options.compensation != "dense":
            return load_fang_inputs(art)
        from ..core.params import load_block

        return load_fang_inputs(art, token_ids=True, batch_size=load_block("prune", path=params_path).batch_size)

    def check(self, model: nn.Module) -> None:
        require(
            self.inputs is not None,
            f"prune.method={self.name} needs the FANG analysis artifacts (cluster PCA/centroids and centre distances, "
            "neuron groups, block sparsity): run the cluster, taylor, group and allocate stages and pass them "
            "as inputs",
        )
        n_ffns = [layer.mlp.down_proj.in_features for layer in decoder_layers(model)]
        require(len(set(n_ffns)) == 1, "FANG needs a dense model: the FFN widths differ between layers")
        self.inputs.validate(len(n_ffns), model.config.hidden_size, n_ffns[0])
        if self.dense_refit:
            require(self.base == "obc", f"{self.name}+dense: the dense-target refit is for O-FANG's OBC refit only "
                                        f"(use o_fang+dense; {self.name} compensates by FLAP's bias)")
            ids = self.inputs.token_ids
            require(ids is not None, f"{self.name}+dense needs the calibration token ids for its dense stream "
                                     "(FangInputs.token_ids: `load_fang_inputs(..., token_ids=True)` reads the capture's)")
            check_token_ids(ids, model.config.vocab_size, f"{self.name}+dense")
            self._stream = DenseStream(model, ids, self.inputs.batch_size, f"{self.name}+dense")

    def own_allocation(self) -> AllocationScores | Tensor:
        """ASA: the allocate stage's block scores, or the per-block sparsity the inputs give instead."""
        return self.inputs.allocation if self.inputs.sparsity is None else self.inputs.sparsity

    def ffn_floors(self, n_ffns: list[int]) -> list[int]:
        """Per block: the shared group when it is exempt, plus the one neuron every group keeps (`plan_groups`
        caps the removal there)."""
        k, out = self.inputs.k, []
        for li, n in enumerate(n_ffns):
            groups = plan_groups(self.inputs.neuron_groups[li], k, torch.eye(k, dtype=torch.float64), n,
                                 self.options.shared_group, self.options.function_aware)
            out.append(n - sum(g.n_remove for g in groups))
        return out

    def attention(self, ctx: LayerContext) -> UnitPruner:
        n = ctx.layer.self_attn.o_proj.in_features
        if self.base == "flap":
            return flap_pruner(n, ctx.where("o_proj"))
        heads = ObcPruner(n, self.options.damp, ctx.where("o_proj"), ctx.device)
        if not self.dense_refit:
            return heads
        require(self._stream is not None, f"{self.name}+dense: check(model) must run before the blocks are pruned")
        o_targets, self._mlp_targets = self._stream.targets(ctx)  # the block's dense outputs, before pruning it
        return DenseTargetPruner(heads, o_targets)  # one-shot OBC on W*: heads chosen and refit towards the dense output

    def ffn(self, ctx: LayerContext) -> FangFfnPruner:
        o, li = self.options, ctx.index
        alpha = relevance_weights(self.inputs.center_distances[li], float(o.tau), o.reweighting)
        group_ids = self.inputs.neuron_groups[li]
        n_remove = ctx.n_ffn - ctx.keep_mlp
        groups = plan_groups(group_ids, self.inputs.k, alpha, n_remove, o.shared_group, o.function_aware)
        targets, self._mlp_targets = self._mlp_targets, None
        inner = FangLayerPruner(self.base, groups, group_ids, self.inputs.k, o.damp, ctx.where("down_proj"), ctx.device,
                                compensation=o.compensation, targets=targets)
        ctx.entry.update(ffn_removed_target=n_remove)
        self._alpha[li] = alpha  # for finish_layer's diagnostics
        return FangFfnPruner(inner, self.inputs, li)

    def finish_layer(self, ctx: LayerContext, ffn: Selection) -> None:
        if "token_clusters" not in ffn.info:
            return
        li, entry = ctx.index, ctx.entry
        counts = torch.tensor(ffn.info["token_clusters"])
        own = own_cluster_weight(self._alpha[li], counts)
        entry["own_cluster_weight"] = [round(v, 6) for v in own]
        empty = int((counts == 0).sum())
        if empty:
            entry["empty_clusters"] = empty
            warn(f"layer {li}: {empty} of {len(counts)} token clusters received no calibration token")
        if ffn.info.get("groups_without_tokens"):
            warn(f"layer {li}: {', '.join(ffn.info['groups_without_tokens'])} had no weighted token: "
                 "ranked without reweighting (FLAP: all tokens; OBC: H = I, no compensation)")
