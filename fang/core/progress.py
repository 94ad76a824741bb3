"""One progress-bar style for every long loop (rich), quiet when stderr is not a terminal under CI."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _console() -> Console:
    # Not a terminal (DVC, a pipe, a log file): rich would wrap at 80 columns and split paths in
    # summary lines; a wide console keeps each message on one line. COLUMNS still wins if set.
    tty = sys.stderr.isatty()
    return Console(stderr=True, width=None if tty or os.environ.get("COLUMNS") else 400)


console = _console()


def progress() -> Progress:
    # DVC pipes stage output; keep bars on unless explicitly disabled (FANG_NO_PROGRESS=1).
    disable = bool(os.environ.get("FANG_NO_PROGRESS")) or ("pytest" in sys.modules)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )


def warn(message: str) -> None:
    """A warning a user should see in the stage log (yellow on a terminal), never fatal."""
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)
