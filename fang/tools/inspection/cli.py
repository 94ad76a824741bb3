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

from pathlib import Path
from typing import Optional

import typer

from ...core.errors import FangError
from .clusters import cluster_stats, cluster_tokens, clusters_table, tokens_renderables
from .common import ArtifactsOpt, PngOpt, _console, _load_tokenizer, _wrote
from .groups import all_layer_groups, groups_layer_table, groups_overview_table, layer_groups
from .neurons import neurons as _neurons_view
from .plots import plot_cluster_sizes, plot_scores, plot_sparsity
from .sparsity import allocation, sparsity_table


app = typer.Typer(
    name="inspect",
    help="Inspect clusters, groups and sparsity from the artifacts (never loads model weights). "
    "Each view needs only its own artifacts; `all` shows every view whose artifacts exist.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    from .pruned import plot as plot_pruned, read_runs, structure_table

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
app.command("neurons")(_neurons_view)
