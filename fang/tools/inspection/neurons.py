"""`fang inspect neurons`: a neuron's top contexts and topic selectivity, or a topic's most selective
neurons, from artifacts/attribution.zarr (written by `fang attribute`) and the tokenizer only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich.table import Table
from rich.text import Text

from ...core import paths
from ...core.errors import require
from .common import (
    HIGHLIGHT_CLOSE,
    HIGHLIGHT_OPEN,
    _artifact,
    _console,
    _decode_parts,
    _layer_index,
    _load_tokenizer,
    _num_column,
    _open,
    _save,
    _table,
    _visible,
    _wrote,
)


@dataclass
class Context:
    seq: int
    pos: int
    value: float  # signed activation h
    topic: str
    left: str
    token: str
    right: str


@dataclass
class NeuronView:
    layer: int
    neuron: int
    label: Optional[str]
    mean_abs: float
    by_topic: list[tuple[str, float, float, bool]]  # topic, selectivity (NaN = guarded), q-value, selective
    contexts: list[Context]
    removed_by: list[tuple[str, bool]] = field(default_factory=list)  # pruned model, removed this neuron?


def _store(root: Path):
    return _open(_artifact(root, paths.ATTRIBUTION), "attribution", "attribute")


def _topic_index(topics: list[str], topic: str) -> int:
    require(topic in topics, f"unknown topic {topic!r}; the attribution has: {', '.join(topics)}")
    return topics.index(topic)


def pruned_models(root: Path) -> list[Path]:
    """Pruned checkpoints under the artifacts root: the single run, the sweep and the bias study."""
    candidates = [_artifact(root, paths.PRUNED), *sorted(_artifact(root, paths.SWEEP).glob("*")),
                  *sorted(_artifact(root, paths.BIAS_SWEEP).glob("*/*"))]
    return [c for c in candidates if (c / "structure.json").is_file()]


def removed_by(root: Path, layer: int, neuron: int, n_ffn: int) -> list[tuple[str, bool]]:
    """(model, removed?) for every pruned model whose structure.json tells (kept_neurons, or a full block)."""
    import json

    from ...model.shrink import KEPT_ATTR

    out = []
    for model in pruned_models(root):
        try:
            spec = json.loads((model / "structure.json").read_text())["layers"][layer]
        except (OSError, ValueError, KeyError, IndexError):
            continue
        if KEPT_ATTR in spec:
            out.append((str(model.relative_to(root)), neuron not in set(spec[KEPT_ATTR])))
        elif int(spec.get("intermediate_size", -1)) == n_ffn:
            out.append((str(model.relative_to(root)), False))
    return out


def neuron_view(root: Path, layer: int, neuron: int, top: int = 8, context: int = 8, tokenizer=None) -> NeuronView:
    store = _store(root)
    topics, n_layers, n_ffn = list(store.attrs["topics"]), int(store.attrs["n_layers"]), int(store.attrs["n_ffn"])
    layer = _layer_index(layer, n_layers)
    require(0 <= neuron < n_ffn, f"--neuron {neuron} is out of range: layer {layer} has {n_ffn} neurons (0..{n_ffn - 1})")
    sel = np.asarray(store["selectivity"][layer, :, neuron], dtype=np.float64)
    q = np.asarray(store["q_value"][layer, :, neuron], dtype=np.float64)
    is_sel = np.asarray(store["selective"][layer, :, neuron])
    label = int(store["label"][layer, neuron])
    order = np.argsort(-np.nan_to_num(sel, nan=-np.inf), kind="stable")
    ids = np.asarray(store["token_ids"][:], dtype=np.int64)
    token_topic = np.asarray(store["token_topic"][:])
    seq_len = ids.shape[1]
    tokenizer = tokenizer or _load_tokenizer(root)
    contexts = []
    idx, val = store["top_index"][layer, neuron], store["top_value"][layer, neuron]
    for t, v in list(zip(idx.tolist(), val.tolist()))[:top]:
        if t < 0:
            continue
        n, pos = divmod(t, seq_len)
        a, b = max(0, pos - context), min(seq_len, pos + context + 1)
        left, tok, right = _decode_parts(tokenizer, ids[n, a:b].tolist(), pos - a)
        k = int(token_topic[n, pos])
        contexts.append(Context(n, pos, float(v), topics[k] if k >= 0 else "?", left, tok, right))
    return NeuronView(layer, neuron, None if label < 0 else topics[label],
                      float(store["mean_abs"][layer, neuron]),
                      [(topics[k], float(sel[k]), float(q[k]), bool(is_sel[k])) for k in order], contexts,
                      removed_by(Path(root), layer, neuron, n_ffn))


def neuron_renderables(v: NeuronView) -> list[Any]:
    head = Text.assemble((f"layer {v.layer}, neuron {v.neuron}: ", "bold"),
                         f"label {v.label or '— (selective for no topic)'}; mean |h| {v.mean_abs:.4g} over all tokens")
    sel = ", ".join(f"{t} {s:.2f}{'*' if ok else ''}" for t, s, _, ok in v.by_topic if np.isfinite(s))
    out: list[Any] = [head, Text(f"selectivity (mean |h| on topic / overall; * = selective): {sel}", style="dim")]
    table = Table(show_header=True, box=None, pad_edge=False)
    table.add_column("seq:pos", justify="right", no_wrap=True)
    table.add_column("h", justify="right", no_wrap=True)
    table.add_column("topic", no_wrap=True)
    table.add_column("context", overflow="fold")
    for c in v.contexts:
        ctx = Text.assemble((_visible(c.left), "dim"), (HIGHLIGHT_OPEN + _visible(c.token) + HIGHLIGHT_CLOSE, "bold reverse"),
                            (_visible(c.right), "dim"))
        table.add_row(f"{c.seq}:{c.pos}", f"{c.value:+.3g}", c.topic, ctx)
    out.append(table)
    if v.removed_by:
        out.append(Text("removed by: " + (", ".join(m for m, gone in v.removed_by if gone) or "none") + "; kept by: "
                        + (", ".join(m for m, gone in v.removed_by if not gone) or "none"), style="dim"))
    return out


def topic_table(root: Path, layer: int, topic: str, top: int = 10) -> Table:
    """The layer's neurons most selective for `topic`, with their label and q-value."""
    store = _store(root)
    topics = list(store.attrs["topics"])
    layer = _layer_index(layer, int(store.attrs["n_layers"]))
    k = _topic_index(topics, topic)
    sel = np.asarray(store["selectivity"][layer, k], dtype=np.float64)
    q = np.asarray(store["q_value"][layer, k], dtype=np.float64)
    selective = np.asarray(store["selective"][layer, k])
    label = np.asarray(store["label"][layer])
    tokens, articles = int(store["topic_tokens"][k]), int(store["topic_articles"][k])
    caption = "selectivity = mean |h| on the topic's tokens / over all tokens; q = Benjamini-Hochberg q-value " \
              "(article-level Welch test); label = the neuron's most selective topic"
    table = _table(f"layer {layer}, topic {topic} ({tokens:,} tokens, {articles} articles): "
                   f"{int(selective.sum())} selective neurons", caption)
    if not np.isfinite(sel).any():
        table.footnote = f"{topic} is guarded (too few tokens or articles): no selectivity. " + caption
    for h in ("neuron", "selectivity", "q"):
        _num_column(table, h)
    table.add_column("selective")
    table.add_column("label")
    for j in np.argsort(-np.nan_to_num(sel, nan=-np.inf), kind="stable")[:top]:
        if not np.isfinite(sel[j]):
            break
        table.add_row(str(j), f"{sel[j]:.2f}", f"{q[j]:.2g}", "yes" if selective[j] else "",
                      "—" if label[j] < 0 else topics[label[j]])  # < 0: attribute.NO_LABEL
    return table


def layer_table(root: Path, layer: int) -> Table:
    store = _store(root)
    topics = list(store.attrs["topics"])
    layer = _layer_index(layer, int(store.attrs["n_layers"]))
    selective = np.asarray(store["selective"][layer])
    label = np.asarray(store["label"][layer])
    table = _table(f"layer {layer}: selective and labelled neurons per topic (of {label.size})",
                   "pass --neuron J for a neuron's contexts or --topic T for a topic's neurons")
    table.add_column("topic")
    for h in ("tokens", "selective", "labelled"):
        _num_column(table, h)
    for k, t in enumerate(topics):
        table.add_row(t, f"{int(store['topic_tokens'][k]):,}", str(int(selective[k].sum())), str(int((label == k).sum())))
    return table


def plot_neuron(v: NeuronView, out_dir: Path) -> Path:
    from matplotlib.figure import Figure

    shown = [(t, s, ok) for t, s, _, ok in v.by_topic if np.isfinite(s)]
    fig = Figure(figsize=(7, 3))
    ax = fig.add_subplot()
    ax.bar(range(len(shown)), [s for _, s, _ in shown], color=["tab:red" if ok else "tab:gray" for *_, ok in shown])
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    ax.set_xticks(range(len(shown)), [t[:14] for t, *_ in shown], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("selectivity")
    ax.set_title(f"layer {v.layer}, neuron {v.neuron}: mean |h| on topic / overall (red = selective)", fontsize=9)
    return _save(fig, Path(out_dir) / f"neuron_l{v.layer}_n{v.neuron}.png")


def plot_topic(root: Path, layer: int, topic: str, out_dir: Path) -> Path:
    from matplotlib.figure import Figure

    store = _store(root)
    topics = list(store.attrs["topics"])
    layer = _layer_index(layer, int(store.attrs["n_layers"]))
    k = _topic_index(topics, topic)
    sel = np.asarray(store["selectivity"][layer, k], dtype=np.float64)
    selective = np.asarray(store["selective"][layer, k])
    require(np.isfinite(sel).any(), f"{topic} is guarded (too few tokens or articles): nothing to plot")
    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    bins = np.linspace(np.nanmin(sel), np.nanmax(sel), 60)
    ax.hist(sel[~selective], bins=bins, color="tab:gray", label="not selective")
    ax.hist(sel[selective], bins=bins, color="tab:red", label="selective")
    ax.set_yscale("log")
    ax.set_xlabel(f"selectivity for {topic}")
    ax.set_ylabel("neurons")
    ax.set_title(f"layer {layer}: {int(selective.sum())} neurons selective for {topic}", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, Path(out_dir) / f"topic_l{layer}_{topic.replace(' ', '_')}.png")


def neurons(
    layer: int = typer.Option(..., "--layer", "-l", help="decoder layer (negative counts from the end)"),
    neuron: Optional[int] = typer.Option(None, "--neuron", "-j", help="show this neuron's top contexts and selectivity"),
    topic: Optional[str] = typer.Option(None, "--topic", "-t", help="show this topic's most selective neurons"),
    top: int = typer.Option(8, "--top", "-n", help="contexts (with --neuron) or neurons (with --topic) shown"),
    context: int = typer.Option(8, "--context", help="tokens of context shown on each side"),
    artifacts: Path = typer.Option(Path("artifacts"), "--artifacts", "-a", help="artifacts root written by `dvc repro`"),
    png: Optional[Path] = typer.Option(None, "--png", help="also write a PNG plot into this directory"),
) -> None:
    """Neuron attribution: a neuron's top contexts (token marked ⟦ ⟧) and topic selectivity, or a topic's most
    selective neurons; with neither, the layer's selective neurons per topic. Needs attribution.zarr and model/."""
    require(neuron is None or topic is None, "give --neuron or --topic, not both")
    require(top >= 1 and context >= 0, "--top must be >= 1 and --context >= 0")
    console = _console()
    if neuron is not None:
        v = neuron_view(artifacts, layer, neuron, top, context)
        for r in neuron_renderables(v):
            console.print(r)
        if png:
            _wrote(console, plot_neuron(v, png))
    elif topic is not None:
        console.print(topic_table(artifacts, layer, topic, top))
        if png:
            _wrote(console, plot_topic(artifacts, layer, topic, png))
    else:
        console.print(layer_table(artifacts, layer))
