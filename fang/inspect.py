"""`fang inspect`: look at what the analysis stages found, from their artifacts only.

Views (each needs only the artifacts it reads, and names the stage to run when one is missing):
  clusters  cluster.zarr                        token-cluster sizes per layer, smallest/largest share, inertia
  tokens    cluster.zarr, capture.zarr, model/  decoded context around sample tokens of one cluster
  groups    groups.zarr, taylor.zarr            functional/shared neuron groups and their top neurons
  sparsity  allocate.json                       functional complexity and head/FFN sparsity per block
  neurons   attribution.zarr, model/            a neuron's top contexts and topic selectivity, a topic's neurons
  all       whatever exists                     every view above, plus PNG plots with --png

Model weights are never loaded; `tokens` loads only the tokenizer from artifacts/model, and reads
the token ids from calib/ when capture.zarr has been deleted to save space.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import paths
from .atomic import atomic_file
from .errors import FangError, require

# Shown around the sample token, so it stays visible where rich styles are dropped (pipes, logs).
HIGHLIGHT_OPEN, HIGHLIGHT_CLOSE = "⟦", "⟧"
# Control characters would break a table row; show them as visible symbols instead.
_VISIBLE = str.maketrans({"\n": "⏎", "\r": "␍", "\t": "⇥"})


def _open(path: Path, kind: str, stage: str):
    # imported on use: zarr takes a noticeable part of a second, and `fang --help` imports this module
    from .store import open_store

    return open_store(path, kind, stage)


class _TitledTable(Table):
    """A compact table whose title and caption are printed at full console width.

    A rich table title wraps to the table's own width, which for a narrow table splits a
    one-line headline over three. Both are plain Text, so "[g, j]" is not read as markup.
    """

    def __init__(self, title: str, caption: str = "") -> None:
        # light box, no padding at the edges: a 7-cluster table of 5-digit counts fits 80 columns
        super().__init__(box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
        self.headline, self.footnote = title, caption

    def __rich_console__(self, console, options):
        yield Text(self.headline, style="bold")
        yield from super().__rich_console__(console, options)
        if self.footnote:
            yield Text(self.footnote, style="dim")


def _table(title: str, caption: str = "") -> Table:
    return _TitledTable(title, caption)


def _num_column(table: Table, header: str) -> None:
    # fold rather than "…": a cut-off number reads as a different number
    table.add_column(header, justify="right", overflow="fold")


def _artifact(root: Path, default: Path) -> Path:
    """The path of one artifact under `root`, keeping paths.py's layout (artifacts/... -> root/...)."""
    return Path(root) / default.relative_to(paths.ARTIFACTS)


# ------------------------------------------------------------------------------- clusters


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


# --------------------------------------------------------------------------------- tokens


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
        from .capture import open_capture  # here, not at the top: it imports torch, slow for `fang --help`

        return np.asarray(open_capture(capture)["token_ids"][:], dtype=np.int64)
    calib = _artifact(root, paths.CALIB) / "calib.safetensors"
    if calib.exists():
        from safetensors.numpy import load_file

        return np.asarray(load_file(calib)["input_ids"], dtype=np.int64)
    raise FangError(f"calibration tokens not found: neither {capture} nor {calib} (run `dvc repro capture` first)")


def _load_tokenizer(root: Path):
    model = _artifact(root, paths.MODEL)
    if not any((model / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FangError(f"no tokenizer in {model} (run `dvc repro fetch_model` first)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def _decode_parts(tokenizer, window: list[int], at: int) -> tuple[str, str, str]:
    """(left, token, right) text of `window` with window[at] as the token.

    Decoding the prefixes and cutting the strings keeps the spacing a tokenizer only applies in
    context (SentencePiece drops a word's leading space when it is decoded alone); when the
    prefixes do not nest (byte-level pieces of one character), each part is decoded on its own.
    """
    def dec(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    left, upto, full = dec(window[:at]), dec(window[: at + 1]), dec(window)
    if upto.startswith(left) and full.startswith(upto):
        return left, upto[len(left):], full[len(upto):]
    return left, dec(window[at : at + 1]), dec(window[at + 1 :])


def _visible(s: str) -> str:
    return s.translate(_VISIBLE)


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


# --------------------------------------------------------------------------------- groups


@dataclass
class GroupInfo:
    group: int  # 0..k-1 functional (matched to the cluster of the same id), k = shared
    size: int
    tokens: Optional[int]  # calibration tokens of the matched cluster (functional groups)
    mass_share: float  # functional: share of S[g] held by the group; shared: share of all of S
    best_fit: Optional[float]  # functional: share of members whose highest-scoring cluster is g
    top: list[tuple[int, float]]  # (neuron, score): S[g, j] for functional, sum_c S[c, j] for shared


@dataclass
class LayerGroups:
    layer: int
    k: int
    n_neurons: int
    method: str
    functional: list[GroupInfo]
    shared: GroupInfo
    assigned_score: float  # sum over non-shared neurons of S[group_j, j]
    gain_over_greedy: Optional[float]  # from metrics/groups.json, when the exact solver ran


def _scores_and_groups(root: Path) -> tuple[Any, Any, int, str]:
    groups = _open(_artifact(root, paths.GROUPS), "groups", "group")
    taylor = _open(_artifact(root, paths.TAYLOR), "taylor", "taylor")
    n_layers, k, n = taylor["scores"].shape
    require(
        tuple(groups["neuron_groups"].shape) == (n_layers, n) and int(groups.attrs.get("k", k)) == k,
        f"{_artifact(root, paths.GROUPS)} does not match {_artifact(root, paths.TAYLOR)} "
        f"({tuple(groups['neuron_groups'].shape)} vs {n_layers} layers x {n} neurons, k={k}): rerun `dvc repro group`",
    )
    return taylor, groups, k, str(groups.attrs.get("method", "?"))


def _groups_metrics(root: Path) -> dict:
    # optional: only adds the exact-vs-greedy gain
    f = _artifact(root, paths.METRICS) / "groups.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return {}


def _layer_index(layer: int, n_layers: int) -> int:
    require(-n_layers <= layer < n_layers, f"--layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return layer % n_layers


def _summarise_layer(s: np.ndarray, g: np.ndarray, k: int, top: int, counts: Optional[np.ndarray]) -> tuple[list[GroupInfo], GroupInfo, float]:
    s = s.astype(np.float64)
    best = s.argmax(axis=0)
    functional = []
    for c in range(k):
        members = np.flatnonzero(g == c)
        own = s[c, members]
        order = members[np.argsort(-own, kind="stable")[:top]]
        row_total = s[c].sum()
        functional.append(GroupInfo(
            group=c, size=int(members.size),
            tokens=None if counts is None else int(counts[c]),
            mass_share=float(own.sum() / row_total) if row_total > 0 else 0.0,
            best_fit=float((best[members] == c).mean()) if members.size else 0.0,
            top=[(int(j), float(s[c, j])) for j in order],
        ))
    shared = np.flatnonzero(g == k)
    total = s.sum(axis=0)
    order = shared[np.argsort(-total[shared], kind="stable")[:top]]
    grand = total.sum()
    shared_info = GroupInfo(
        group=k, size=int(shared.size), tokens=None,
        mass_share=float(total[shared].sum() / grand) if grand > 0 else 0.0,
        best_fit=None, top=[(int(j), float(total[j])) for j in order],
    )
    rest = np.flatnonzero(g < k)
    assigned = float(s[g[rest], rest].sum())
    return functional, shared_info, assigned


def _layer_groups(taylor, groups, k: int, method: str, per_layer: list, layer: int, top: int) -> LayerGroups:
    counts = np.asarray(taylor["token_counts"][layer]) if "token_counts" in taylor else None
    functional, shared, assigned = _summarise_layer(
        np.asarray(taylor["scores"][layer]), np.asarray(groups["neuron_groups"][layer]), k, top, counts
    )
    gain = per_layer[layer].get("gain_over_greedy") if layer < len(per_layer) else None
    return LayerGroups(layer, k, int(taylor["scores"].shape[2]), method, functional, shared, assigned, gain)


def layer_groups(root: Path, layer: int, top: int = 5) -> LayerGroups:
    """One layer's groups: sizes, score mass, best-fit share and top neurons (negative layer counts from the end)."""
    taylor, groups, k, method = _scores_and_groups(root)
    layer = _layer_index(layer, taylor["scores"].shape[0])
    return _layer_groups(taylor, groups, k, method, _groups_metrics(root).get("layers", []), layer, top)


def all_layer_groups(root: Path, top: int = 5) -> list[LayerGroups]:
    taylor, groups, k, method = _scores_and_groups(root)
    per_layer = _groups_metrics(root).get("layers", [])
    return [_layer_groups(taylor, groups, k, method, per_layer, li, top) for li in range(taylor["scores"].shape[0])]


def _neurons(top: list[tuple[int, float]]) -> str:
    return "  ".join(f"{j}:{v:.3g}" for j, v in top)


def groups_overview_table(layers: list[LayerGroups]) -> Table:
    first = layers[0]
    table = _table(
        f"neuron groups per layer ({first.method}): {first.n_neurons} FFN neurons = k={first.k} functional groups + 1 shared",
        "mass: share of the Taylor score mass the shared group holds; best-fit: mean share of functional-group "
        "neurons whose highest-scoring cluster is their own group's",
    )
    for name in ("layer", "shared", "functional sizes", "assigned score", "gain vs greedy", "shared mass", "best-fit"):
        _num_column(table, name)
    for lg in layers:
        sizes = [g.size for g in lg.functional]
        table.add_row(
            str(lg.layer), str(lg.shared.size),
            f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}",
            f"{lg.assigned_score:.4g}",
            "-" if lg.gain_over_greedy is None else f"{lg.gain_over_greedy:+.2%}",
            f"{lg.shared.mass_share:.1%}",
            f"{np.mean([g.best_fit for g in lg.functional]):.1%}",
        )
    return table


def groups_layer_table(lg: LayerGroups) -> Table:
    table = _table(
        f"layer {lg.layer}: neuron groups ({lg.method}), top neurons as neuron:score",
        "functional group g is matched to token cluster g; its neurons ranked by S[g, j]. "
        "Shared group ranked by the score summed over all clusters. mass: share of the cluster's "
        "score row (shared: of all of S) the group holds; best-fit: members whose top cluster is g",
    )
    table.add_column("group", justify="right", no_wrap=True)
    for header in ("size", "tokens", "mass", "best-fit"):
        _num_column(table, header)
    table.add_column(f"top {max((len(g.top) for g in [*lg.functional, lg.shared]), default=0)} neurons", overflow="fold")
    for g in lg.functional:
        table.add_row(f"g{g.group}", str(g.size), "-" if g.tokens is None else f"{g.tokens:,}",
                      f"{g.mass_share:.1%}", f"{g.best_fit:.0%}", _neurons(g.top))
    sh = lg.shared
    table.add_row("shared", str(sh.size), "all", f"{sh.mass_share:.1%}", "-", _neurons(sh.top), style="bold")
    return table


# ------------------------------------------------------------------------------- sparsity


@dataclass
class Allocation:
    mode: str
    target: float
    mean: float
    fc: list[float]
    scores: list[float]
    attn: list[float]
    ffn: list[float]


def allocation(root: Path, target: float | None = None) -> Allocation:
    """Scores from allocate.json and the per-block sparsity of one sweep target from block_sparsity.json."""
    f = _artifact(root, paths.ALLOCATE)
    fs = _artifact(root, paths.BLOCK_SPARSITY)
    if not f.exists() or not fs.exists():
        raise FangError(f"sparsity allocation not found: {f if not f.exists() else fs} (run `dvc repro allocate` first)")
    try:
        a = json.loads(f.read_text())
        by_target = json.loads(fs.read_text())["by_target"]
        key = next((t for t in by_target if target is None or abs(float(t) - target) < 1e-9), None)
        require(key is not None, f"no allocation for target {target} in {fs}; targets: {', '.join(by_target)} (sweep.sparsities)")
        fc = [float(x) for x in a["functional_complexity"]]
        attn = [float(x) for x in by_target[key]["attn_sparsity"]]
        ffn = [float(x) for x in by_target[key]["ffn_sparsity"]]
        alloc = Allocation(
            mode=str(a.get("mode", "?")), target=float(key),
            mean=float(by_target[key].get("mean_sparsity", np.mean(ffn))),
            fc=fc, scores=[float(x) for x in (a.get("scores") or fc)], attn=attn, ffn=ffn,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise FangError(f"{f} is malformed ({exc!r}); rerun `dvc repro allocate`") from None
    require(len(fc) > 0 and len(fc) == len(attn) == len(ffn) == len(alloc.scores),
            f"{f} has empty or unequal per-layer lists; rerun `dvc repro allocate`")
    return alloc


def sparsity_table(a: Allocation) -> Table:
    table = _table(
        f"sparsity allocation ({a.mode}): target {a.target:.3f}, mean {a.mean:.3f}, "
        f"FFN range {min(a.ffn):.3f}..{max(a.ffn):.3f}",
        "FC = 1 - mean cos(block input, block output) (Eq. 8): blocks that change tokens more get less sparsity",
    )
    show_scores = a.scores != a.fc  # taylor mode allocates by block sensitivity, not FC
    for header in ["layer", "FC", *([f"{a.mode} score"] if show_scores else []), "attn sparsity", "FFN sparsity"]:
        _num_column(table, header)
    table.add_column("", no_wrap=True)
    top = max(max(a.ffn), max(a.attn), 1e-12)
    for li in range(len(a.fc)):
        bar = "█" * round(20 * a.ffn[li] / top)
        row = [str(li), f"{a.fc[li]:.4f}"] + ([f"{a.scores[li]:.4g}"] if show_scores else [])
        table.add_row(*row, f"{a.attn[li]:.3f}", f"{a.ffn[li]:.3f}", bar)
    return table


# ---------------------------------------------------------------------------------- plots
# matplotlib's object API with the Agg canvas: no pyplot global state, no display needed.


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_cluster_sizes(stats: ClusterStats, out_dir: Path) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    frac = stats.sizes / stats.n_tokens
    fig = Figure(figsize=(max(4.0, 0.7 * stats.k + 2), max(3.0, 0.28 * stats.n_layers + 1.5)))
    ax = fig.add_subplot()
    im = ax.imshow(frac, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("cluster (ids are per layer)")
    ax.set_ylabel("layer")
    ax.set_xticks(range(stats.k))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"token share per cluster (k={stats.k}, {stats.n_tokens:,} tokens)")
    if frac.size <= 400:  # numbers stay readable up to ~40 layers x 10 clusters
        for (li, c), v in np.ndenumerate(frac):
            ax.text(c, li, f"{v:.0%}", ha="center", va="center", fontsize=6,
                    color="white" if v < frac.max() * 0.6 else "black")
    fig.colorbar(im, ax=ax, label="share of calibration tokens")
    return _save(fig, Path(out_dir) / "cluster_sizes.png")


def plot_sparsity(a: Allocation, out_dir: Path) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    x = np.arange(len(a.fc))
    fig = Figure(figsize=(8, 5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.bar(x, a.fc, color="tab:purple")
    top.set_ylabel("functional complexity")
    top.set_title(f"per-block allocation ({a.mode}), target sparsity {a.target:.2f}")
    bottom.plot(x, a.attn, "o-", label="attention", color="tab:blue")
    bottom.plot(x, a.ffn, "s--", label="FFN", color="tab:orange")
    bottom.axhline(a.target, color="gray", lw=1, ls=":", label="target")
    bottom.set_xlabel("layer")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_ylabel("sparsity")
    bottom.legend(fontsize=8)
    return _save(fig, Path(out_dir) / "sparsity_by_layer.png")


def plot_scores(root: Path, layer: int, out_dir: Path) -> Path:
    """S of one layer [k, n], neurons sorted by group (functional 0..k-1, then shared), then by score."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    taylor, groups, k, method = _scores_and_groups(root)
    layer = _layer_index(layer, taylor["scores"].shape[0])
    s = np.asarray(taylor["scores"][layer], dtype=np.float64)
    g = np.asarray(groups["neuron_groups"][layer])
    # within a functional group by its own cluster's score; shared by the total over clusters
    key = np.where(g < k, s[np.minimum(g, k - 1), np.arange(g.size)], s.sum(axis=0))
    order = np.lexsort((-key, g))
    sorted_s = s[:, order]
    positive = sorted_s[sorted_s > 0]
    # Taylor scores span orders of magnitude: a log colour scale keeps the small ones visible
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    fig = Figure(figsize=(11, 0.35 * k + 2))
    ax = fig.add_subplot()
    im = ax.imshow(np.where(sorted_s > 0, sorted_s, np.nan), aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
    bounds = np.cumsum(np.bincount(g, minlength=k + 1))
    for b in bounds[:-1]:
        ax.axvline(b - 0.5, color="cyan", lw=0.8)
    mids = (np.concatenate([[0], bounds[:-1]]) + bounds) / 2
    ax.set_xticks(mids, [f"g{c}" for c in range(k)] + ["shared"], fontsize=7)
    ax.set_yticks(range(k), [f"c{c}" for c in range(k)])
    ax.set_ylabel("token cluster")
    ax.set_xlabel("FFN neurons, sorted by group")
    ax.set_title(f"layer {layer}: Taylor scores S (Eq. 5), groups by {method}")
    fig.colorbar(im, ax=ax, label="S (log scale)")
    return _save(fig, Path(out_dir) / f"scores_layer{layer}.png")


# ------------------------------------------------------------------------------------ CLI

app = typer.Typer(
    name="inspect",
    help="Inspect clusters, groups and sparsity from the artifacts (never loads model weights). "
    "Each view needs only its own artifacts; `all` shows every view whose artifacts exist.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ArtifactsOpt = typer.Option(Path("artifacts"), "--artifacts", "-a", help="artifacts root written by `dvc repro`")
PngOpt = typer.Option(None, "--png", help="also write PNG plots into this directory (e.g. artifacts/plots/inspect)")


def _console() -> Console:
    # built per call: picks up the terminal width (or $COLUMNS) of the current run
    return Console(highlight=False)


def _wrote(console: Console, path: Path) -> None:
    console.print(f"wrote {path}", style="green", markup=False)


@app.command()
def clusters(artifacts: Path = ArtifactsOpt, png: Optional[Path] = PngOpt) -> None:
    """Token-cluster sizes per layer (layer x cluster), smallest/largest share, KMeans inertia. Needs cluster.zarr."""
    console = _console()
    stats = cluster_stats(artifacts)
    console.print(clusters_table(stats))
    if png:
        _wrote(console, plot_cluster_sizes(stats, png))


@app.command()
def tokens(
    layer: int = typer.Option(..., "--layer", "-l", help="decoder layer (negative counts from the end)"),
    cluster: int = typer.Option(..., "--cluster", "-c", help="token cluster of that layer, 0..k-1"),
    samples: int = typer.Option(8, "--samples", "-n", help="sample tokens, spread over different sequences"),
    context: int = typer.Option(12, "--context", help="tokens of context shown on each side"),
    artifacts: Path = ArtifactsOpt,
) -> None:
    """Decoded text around sample tokens of one cluster (token marked ⟦ ⟧), to judge if clusters are context types.

    Needs cluster.zarr, the calibration tokens (capture.zarr or calib/) and the tokenizer in model/.
    """
    console = _console()
    for r in tokens_renderables(cluster_tokens(artifacts, layer, cluster, samples, context)):
        console.print(r)


@app.command()
def groups(
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="show this layer's groups and top neurons; default: one row per layer"),
    top: int = typer.Option(5, "--top", help="top neurons listed per group"),
    artifacts: Path = ArtifactsOpt,
    png: Optional[Path] = PngOpt,
) -> None:
    """Functional and shared neuron groups: sizes, score mass, top neurons by Taylor score. Needs groups.zarr and taylor.zarr.

    Without --layer: one summary row per layer. With --layer: each group's matched cluster,
    size and top neurons, and the shared group's top neurons by total score; --png plots that
    layer's score matrix S.
    """
    console = _console()
    if layer is None:
        console.print(groups_overview_table(all_layer_groups(artifacts, top)))
        if png:
            console.print("(pass --layer to plot a layer's score matrix)", style="yellow")
        return
    console.print(groups_layer_table(layer_groups(artifacts, layer, top)))
    if png:
        _wrote(console, plot_scores(artifacts, layer, png))


@app.command()
def sparsity(
    artifacts: Path = ArtifactsOpt,
    png: Optional[Path] = PngOpt,
    target: Optional[float] = typer.Option(None, "--target", "-t", help="target sparsity (one of sweep.sparsities); default: the first"),
) -> None:
    """Functional complexity and attention/FFN sparsity per block. Needs allocate.json and block_sparsity.json."""
    console = _console()
    a = allocation(artifacts, target)
    console.print(sparsity_table(a))
    if png:
        _wrote(console, plot_sparsity(a, png))


@app.command()
def pruned(
    reports: Optional[list[Path]] = typer.Argument(
        None, help="prune reports; default: artifacts/metrics/prune.json and every artifacts/sweep/*.prune.json"),
    artifacts: Path = ArtifactsOpt,
    png: Optional[Path] = PngOpt,
) -> None:
    """Per layer and pruned model: KV groups and FFN neurons kept, and each block's reconstruction error
    (plus FANG's weight on its own cluster in the plot). Needs the prune reports, not the models."""
    from .inspect_pruned import plot as plot_pruned, read_runs, structure_table

    console = _console()
    files = list(reports or [])
    if not files:
        main = artifacts / "metrics" / "prune.json"
        files = ([main] if main.exists() else []) + sorted((artifacts / "sweep").glob("*.prune.json"))
    runs = read_runs(files)
    console.print(structure_table(runs))
    if png:
        _wrote(console, plot_pruned(runs, png))


@app.command("all")
def all_views(
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="layer for the token samples and group details; default: the middle layer"),
    samples: int = typer.Option(3, "--samples", "-n", help="sample tokens per cluster"),
    context: int = typer.Option(12, "--context", help="tokens of context shown on each side"),
    top: int = typer.Option(5, "--top", help="top neurons listed per group"),
    artifacts: Path = ArtifactsOpt,
    png: Optional[Path] = PngOpt,
) -> None:
    """Every view whose artifacts exist (missing ones are listed with the stage to run), plus all plots with --png."""
    console = _console()
    shown = 0
    n_layers: Optional[int] = None

    def section(title: str, fn) -> None:
        nonlocal shown
        console.rule(title)
        try:
            fn()
            shown += 1
        except FangError as exc:
            console.print(f"skipped: {exc}", style="yellow", markup=False)

    def do_clusters() -> None:
        nonlocal n_layers
        stats = cluster_stats(artifacts)
        n_layers = stats.n_layers
        console.print(clusters_table(stats))
        if png:
            _wrote(console, plot_cluster_sizes(stats, png))

    def chosen_layer() -> int:
        return layer if layer is not None else (n_layers or 1) // 2

    def do_tokens() -> None:
        stats = cluster_stats(artifacts)
        tokenizer = _load_tokenizer(artifacts)
        for c in range(stats.k):
            for r in tokens_renderables(cluster_tokens(artifacts, chosen_layer(), c, samples, context, 5, tokenizer)):
                console.print(r)

    def do_groups() -> None:
        nonlocal n_layers
        layers = all_layer_groups(artifacts, top)
        n_layers = n_layers or len(layers)
        console.print(groups_overview_table(layers))
        console.print(groups_layer_table(layer_groups(artifacts, chosen_layer(), top)))
        if png:
            _wrote(console, plot_scores(artifacts, chosen_layer(), png))

    def do_sparsity() -> None:
        a = allocation(artifacts)
        console.print(sparsity_table(a))
        if png:
            _wrote(console, plot_sparsity(a, png))

    section("clusters", do_clusters)
    section("cluster tokens", do_tokens)
    section("neuron groups", do_groups)
    section("sparsity", do_sparsity)
    if not shown:
        raise FangError(f"nothing to inspect under {artifacts}: run `dvc repro allocate` (cluster, taylor, group, allocate) first")


# neuron attribution views live in their own module; registered here so `fang inspect neurons` exists
from .inspect_neurons import neurons as _neurons_view  # noqa: E402  (needs the helpers above)

app.command("neurons")(_neurons_view)
