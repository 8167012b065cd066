"""Progress bars (rich) that vanish under ``--quiet`` or when not on a terminal."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(description: str, total: int, quiet: bool = False) -> Iterator[Callable[..., None]]:
    """Yields ``advance(completed=None, **fields)``; a no-op when quiet."""
    if quiet or not sys.stderr.isatty():
        yield lambda *args, **kwargs: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total, status="")

        def advance(completed: int | None = None, status: str = "") -> None:
            if completed is None:
                bar.advance(task)
            else:
                bar.update(task, completed=completed)
            if status:
                bar.update(task, status=status)

        yield advance
