"""rich progress on stderr, switched off cleanly for library use and tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["console", "status", "progress_bar", "Tracker"]

console = Console(stderr=True)


@contextlib.contextmanager
def status(message: str, *, enabled: bool = True) -> Iterator[None]:
    """A spinner with ``message`` while the block runs."""
    if not enabled:
        yield
        return
    with console.status(message):
        yield


class Tracker:
    """Advance a progress task; a no-op when progress is disabled."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def describe(self, text: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text)


@contextlib.contextmanager
def progress_bar(description: str, total: float, *, enabled: bool = True, unit: str = "items") -> Iterator[Tracker]:
    """A progress bar over ``total`` items (``unit="bytes"`` shows sizes and speed)."""
    if not enabled:
        yield Tracker(None, None)
        return
    columns: tuple[ProgressColumn, ...]
    if unit == "bytes":
        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
    else:
        columns = (
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield Tracker(progress, task)
