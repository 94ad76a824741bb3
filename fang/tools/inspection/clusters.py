"""`fang inspect clusters` and `tokens`: token-cluster sizes per layer, and decoded context around sample tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table
from rich.text import Text

from ...core import paths
from ...core.errors import FangError, require
from .common import (
    HIGHLIGHT_CLOSE,
    HIGHLIGHT_OPEN,
    _artifact,
    _decode_parts,
    _layer_index,
    _load_tokenizer,
    _num_column,
    _open,
    _table,
    _visible,
)


@dataclass
class ClusterStats:
    k: int
    n_tokens: int
    sizes: np.ndarray  # int64 [n_layers, k]
    inertia: np.ndarray  # float64 [n_layers]
    attrs: dict[str, Any]

    @property
    def n_layers(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def smallest_fraction(self) -> np.ndarray:
        return self.sizes.min(axis=1) / self.n_tokens

    @property
    def largest_fraction(self) -> np.ndarray:
        return self.sizes.max(axis=1) / self.n_tokens


def cluster_stats(root: Path) -> ClusterStats:
    store = _open(_artifact(root, paths.CLUSTER), "cluster", "cluster")
    sizes = np.asarray(store["cluster_sizes"][:], dtype=np.int64)
    n_tokens = int(sizes[0].sum()) if sizes.size else 0
    require(n_tokens > 0, f"{_artifact(root, paths.CLUSTER)} holds no clustered tokens; rerun `dvc repro cluster`")
    return ClusterStats(
        k=int(store.attrs.get("k", sizes.shape[1])),
        n_tokens=n_tokens,
        sizes=sizes,
        inertia=np.asarray(store["inertia"][:], dtype=np.float64),
        attrs=dict(store.attrs),
    )


def clusters_table(stats: ClusterStats) -> Table:
    table = _table(
        f"token clusters per layer: k={stats.k}, {stats.n_tokens:,} calibration tokens"
        f" (PCA dim {stats.attrs.get('pca_dim', '?')}, seed {stats.attrs.get('seed', '?')})",
        "tokens per cluster; min/max: smallest/largest cluster's share of the tokens. "
        "Cluster ids are per layer: c3 of layer 2 and c3 of layer 5 are unrelated",
    )
    for header in ["layer", *(f"c{c}" for c in range(stats.k)), "min", "max", "inertia"]:
        _num_column(table, header)
    small, large = stats.smallest_fraction, stats.largest_fraction
    for li in range(stats.n_layers):
        table.add_row(
            str(li), *(str(int(s)) for s in stats.sizes[li]),
            f"{small[li]:.1%}", f"{large[li]:.1%}", f"{stats.inertia[li]:.3g}",
        )
    return table


@dataclass
class TokenSample:
    seq: int  # calibration sequence
    pos: int  # position within it
    token_id: int
    left: str
    token: str
    right: str


@dataclass
class ClusterTokens:
    layer: int
    cluster: int
    size: int  # tokens in the cluster
    n_tokens: int  # all calibration tokens
    n_sequences: int  # sequences holding at least one token of the cluster
    total_sequences: int
    samples: list[TokenSample]
    frequent: list[tuple[str, int, float]] = field(default_factory=list)  # token text, count here, share of its uses
    characteristic: bool = False  # frequent lists over-represented tokens (else simply the most frequent)


def pick_samples(labels: np.ndarray, cluster: int, seq_len: int, samples: int) -> np.ndarray:
    """Flat token indices (n * seq_len + pos) of up to `samples` tokens of `cluster`, deterministic.

    Samples go round-robin over the sequences holding the cluster, evenly spaced among them, so
    they come from as many different sequences as possible; within a sequence the picks sit at
    evenly spaced quantiles of its occurrences. A cluster's tokens are often neighbours in one
    sequence, and the first hits would show one context over and over.
    """
    members = np.flatnonzero(np.asarray(labels) == cluster)
    want = min(samples, members.size)
    if want <= 0:
        return np.empty(0, dtype=np.int64)
    seqs, starts, counts = np.unique(members // seq_len, return_index=True, return_counts=True)
    take = np.zeros(seqs.size, dtype=np.int64)
    left = want
    while left > 0:
        room = np.flatnonzero(take < counts)
        chosen = room[np.linspace(0, room.size - 1, min(left, room.size)).round().astype(np.int64)]
        take[chosen] += 1
        left -= chosen.size
    picks = []
    for s in np.flatnonzero(take):
        q = ((np.arange(take[s]) + 0.5) * counts[s] / take[s]).astype(np.int64)
        picks.append(members[starts[s] + q])
    return np.sort(np.concatenate(picks))


def _load_token_ids(root: Path) -> np.ndarray:
    """Calibration token ids [N, L]: from capture.zarr, or the calibration set if capture was deleted."""
    capture = _artifact(root, paths.CAPTURE)
    if (capture / "zarr.json").exists():
        from ...analysis.capture import open_capture

        return np.asarray(open_capture(capture)["token_ids"][:], dtype=np.int64)
    calib = _artifact(root, paths.CALIB) / "calib.safetensors"
    if calib.exists():
        from safetensors.numpy import load_file

        return np.asarray(load_file(calib)["input_ids"], dtype=np.int64)
    raise FangError(f"calibration tokens not found: neither {capture} nor {calib} (run `dvc repro capture` first)")


def cluster_tokens(
    root: Path, layer: int, cluster: int, samples: int = 8, context: int = 12, frequent: int = 10, tokenizer=None
) -> ClusterTokens:
    """Sample tokens of one cluster with ±`context` tokens of their sequence, decoded."""
    require(samples >= 1, f"--samples must be at least 1, got {samples}")
    require(context >= 0, f"--context must be non-negative, got {context}")
    store = _open(_artifact(root, paths.CLUSTER), "cluster", "cluster")
    n_layers, k = store["cluster_sizes"].shape
    layer = _layer_index(layer, n_layers)
    require(0 <= cluster < k, f"--cluster {cluster} is out of range: the clustering has k={k} clusters (0..{k - 1})")
    ids = _load_token_ids(root)
    n_seq, seq_len = ids.shape
    labels = np.asarray(store["token_clusters"][layer])
    require(
        labels.size == ids.size,
        f"{_artifact(root, paths.CLUSTER)} labels {labels.size} tokens but the calibration set has {ids.size}: "
        "rerun `dvc repro cluster`",
    )
    tokenizer = tokenizer or _load_tokenizer(root)
    flat = ids.reshape(-1)
    out = []
    for t in pick_samples(labels, cluster, seq_len, samples).tolist():
        n, pos = divmod(t, seq_len)
        a, b = max(0, pos - context), min(seq_len, pos + context + 1)
        window = ids[n, a:b].tolist()
        left, tok, right = _decode_parts(tokenizer, window, pos - a)
        out.append(TokenSample(n, pos, int(flat[t]), left, tok, right))
    member = labels == cluster
    in_cluster = np.bincount(flat[member], minlength=int(flat.max()) + 1)
    overall = np.bincount(flat, minlength=in_cluster.size)
    # Tokens over-represented in the cluster (share of their uses >= 2x the cluster's share of all
    # tokens, seen at least twice), most frequent first: plain counts would list "the" and "," for
    # every cluster, and share alone would favour tokens seen once. No such token: plain counts.
    share = in_cluster / np.maximum(overall, 1)
    over = (share >= 2 * member.mean()) & (in_cluster >= 2)
    characteristic = bool(over.any())
    top = np.argsort(-np.where(over, in_cluster, -1) if characteristic else -in_cluster, kind="stable")[:frequent]
    top = [i for i in top if (over[i] if characteristic else in_cluster[i] > 0)]
    freq = [(tokenizer.decode([int(i)], skip_special_tokens=False), int(in_cluster[i]), in_cluster[i] / overall[i])
            for i in top]
    return ClusterTokens(
        layer=layer, cluster=cluster, size=int(member.sum()), n_tokens=labels.size,
        n_sequences=int(np.unique(np.flatnonzero(member) // seq_len).size), total_sequences=n_seq,
        samples=out, frequent=freq, characteristic=characteristic,
    )


def tokens_renderables(ct: ClusterTokens) -> list[Any]:
    head = Text.assemble(
        (f"layer {ct.layer}, cluster {ct.cluster}: ", "bold"),
        f"{ct.size:,} of {ct.n_tokens:,} tokens ({ct.size / ct.n_tokens:.1%}) "
        f"in {ct.n_sequences} of {ct.total_sequences} sequences",
    )
    out: list[Any] = [head]
    if ct.frequent:
        # share = how many of that token's occurrences fall in this cluster: high = cluster-specific
        parts = ", ".join(f"{_visible(repr(s))} {n} ({share:.0%})" for s, n, share in ct.frequent)
        label = "over-represented tokens" if ct.characteristic else "most frequent tokens, none over-represented,"
        out.append(Text(f"{label} (count here, share of all its uses that fall here): {parts}", style="dim"))
    if not ct.samples:
        out.append(Text("(no tokens in this cluster)", style="yellow"))
        return out
    table = Table(show_header=True, box=None, pad_edge=False)
    table.add_column("seq:pos", justify="right", no_wrap=True)
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("context", overflow="fold")
    for s in ct.samples:
        ctx = Text.assemble(
            (_visible(s.left), "dim"),
            (HIGHLIGHT_OPEN + _visible(s.token) + HIGHLIGHT_CLOSE, "bold reverse"),
            (_visible(s.right), "dim"),
        )
        table.add_row(f"{s.seq}:{s.pos}", str(s.token_id), ctx)
    out.append(table)
    return out
