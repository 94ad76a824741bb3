"""Markdown output: tables, and generated README sections (text between two HTML-comment markers is replaced,
the rest kept byte for byte)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .atomic import atomic_file
from .errors import require


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def replace_between_markers(readme_path: str | os.PathLike, fragment: str, start: str, end: str) -> None:
    """Replace the text between `start` and `end` in a README with `fragment`, atomically."""
    readme_path = Path(readme_path)
    require(readme_path.exists(), f"no README at {readme_path}")
    text = readme_path.read_text()
    starts, ends = text.count(start), text.count(end)
    require(starts == 1 and ends == 1,
            f"{readme_path} must contain {start} and {end} exactly once each "
            f"(found {starts} and {ends}): add them where the generated results go")
    i, j = text.index(start), text.index(end)
    require(i < j, f"{readme_path}: {end} comes before {start}")
    body = "\n" + fragment.strip("\n") + "\n"
    with atomic_file(readme_path) as fh:
        fh.write(text[:i] + start + body + end + text[j + len(end):])


def publish(readme_path: str | os.PathLike, image: str | os.PathLike, image_rel: str,
            fragment: Callable[[str], str], start: str, end: str) -> None:
    """Copy `image` to `image_rel` beside the README (so the committed README can show it) and replace
    the block between the markers with `fragment(image_rel)`."""
    target = Path(readme_path).parent / image_rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, target)
    replace_between_markers(readme_path, fragment(image_rel), start, end)
