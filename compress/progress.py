"""Progress bars (rich) for anything that takes over a second; silent when asked or when not a terminal."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
_quiet = False
# piped or redirected (CI logs), rich would cut tables such as the lowrank plan to 80 columns
console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=160)


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def quiet() -> bool:
    """-q: no progress bars, no notes (ours, or a library's we call)."""
    return _quiet


def enabled() -> bool:
    return not _quiet and not os.environ.get("COMPRESS_NO_PROGRESS") and sys.stderr.isatty()


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if not enabled():
        yield from items
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        yield from bar.track(items, total=total, description=description)


@contextmanager
def status(message: str):
    if not enabled():
        yield
        return
    with console.status(message):
        yield


def log(message: str) -> None:
    """A one-line note for the human reader (stderr, so --json output stays clean)."""
    if not _quiet:
        console.print(message, highlight=False)
