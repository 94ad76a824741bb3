"""One progress-bar style for every long loop (rich), quiet when stderr is not a terminal under CI."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


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
