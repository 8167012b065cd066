"""Progress on stderr (rich), silent under ``--quiet`` or when stderr is not a terminal.

``progress_bar`` shows done/total, elapsed time and an ETA, and stays on screen
when done (a finished bar is the record of how long a stage took).
``stage(k, n, text)`` prints the overall position of a multi-stage command
(demo, ``reproduce``, grids). ``sub_progress`` lets a long computation inside
one step (a loss landscape, a UMAP embedding, a sharpness estimate) report its
own steps under whatever bar the command shows, without knowing about it.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator

#: the current "inner step done" reporter (set by ``progress_bar``; a no-op outside one)
_SUB: contextvars.ContextVar[Callable[[int, int, str], None] | None] = contextvars.ContextVar(
    "sharp_unlearn_sub_progress", default=None)


def _visible(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def stage(index: int, total: int, text: str, quiet: bool = False) -> None:
    """``stage 3/38: unlearn finetune/sam`` on stderr (stdout stays for tables and --json)."""
    if _visible(quiet):
        print(f"stage {index}/{total}: {text}", file=sys.stderr, flush=True)


def sub_progress(done: int, total: int, what: str = "") -> None:
    """Report ``done`` of ``total`` inner steps of the step now running; a no-op without a bar."""
    report = _SUB.get()
    if report is not None:
        report(done, total, what)


@contextlib.contextmanager
def progress_bar(description: str, total: int, quiet: bool = False) -> Iterator[Callable[..., None]]:
    """Yields ``advance(completed=None, status="")``; a no-op when quiet."""
    if not _visible(quiet):
        yield lambda *args, **kwargs: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total, status="")
        state = {"status": ""}

        def advance(completed: int | None = None, status: str = "") -> None:
            if completed is None:
                bar.advance(task)
            else:
                bar.update(task, completed=completed)
            if status:
                state["status"] = status
                bar.update(task, status=status)

        def inner(done: int, inner_total: int, what: str) -> None:
            # shown in the status column: "landscape 12/121" moves while the outer count waits
            label = what or state["status"]
            bar.update(task, status=f"{label} {done}/{inner_total}".strip())

        token = _SUB.set(inner)
        try:
            yield advance
        finally:
            _SUB.reset(token)
