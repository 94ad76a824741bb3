"""What every `fang inspect` view shares: reading a store, titled tables, token context, the console."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ...core import paths
from ...core.atomic import atomic_file
from ...core.errors import FangError, require


# Shown around the sample token, so it stays visible where rich styles are dropped (pipes, logs).
HIGHLIGHT_OPEN, HIGHLIGHT_CLOSE = "⟦", "⟧"
# Control characters would break a table row; show them as visible symbols instead.
_VISIBLE = str.maketrans({"\n": "⏎", "\r": "␍", "\t": "⇥"})


def _open(path: Path, kind: str, stage: str):
    # imported on use: zarr takes a noticeable part of a second, and `fang --help` imports this module
    from ...analysis.store import open_store

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


def _layer_index(layer: int, n_layers: int) -> int:
    require(-n_layers <= layer < n_layers, f"--layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return layer % n_layers


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    return path


ArtifactsOpt = typer.Option(Path("artifacts"), "--artifacts", "-a", help="artifacts root written by `dvc repro`")


def _guard_png(value: Optional[Path]) -> Optional[Path]:
    """`--png DIR` is checked and locked (fang.core.outputs) before the view reads anything."""
    if value is not None:
        from ...core.outputs import guard_output

        guard_output(value, "png", "--png")
    return value


PngOpt = typer.Option(None, "--png", callback=_guard_png,
                      help="also write PNG plots into this directory (e.g. artifacts/plots/inspect)")


def _console() -> Console:
    # built per call: picks up the terminal width (or $COLUMNS) of the current run
    return Console(highlight=False)


def _wrote(console: Console, path: Path) -> None:
    console.print(f"wrote {path}", style="green", markup=False)
