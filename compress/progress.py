"""Progress bars (rich) for anything that takes over a second; silent when asked, a line every 30 s when piped."""
from __future__ import annotations

import os
import sys
import time
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


def _silenced() -> bool:
    """-q or COMPRESS_NO_PROGRESS: no progress output at all, not even the piped lines."""
    return _quiet or bool(os.environ.get("COMPRESS_NO_PROGRESS"))


def enabled() -> bool:
    return not _silenced() and sys.stderr.isatty()


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if _silenced():
        yield from items
        return
    if not sys.stderr.isatty():
        yield from _plain(items, description, total)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        yield from bar.track(items, total=total, description=description)


def _plain(items: Iterable[T], description: str, total: int | None, every_s: float = 30.0) -> Iterator[T]:
    """Piped (a CI log): a plain line every 30 s instead of a bar, so a long step shows it is alive and how far."""
    start = last = time.monotonic()
    for n, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            console.print(f"{description}: {n}{f'/{total}' if total else ''} ({now - start:.0f} s)", highlight=False)


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
