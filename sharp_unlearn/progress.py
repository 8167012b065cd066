"""Progress on stderr (rich), silent under ``--quiet`` or when stderr is not a terminal.

``progress_bar`` shows done/total, elapsed time and an ETA, and stays on screen
when done (a finished bar is the record of how long a stage took).
``stage(k, n, text)`` prints the overall position of a multi-stage command
(demo, ``reproduce``, grids). ``sub_progress`` lets a long computation inside
one step (a loss landscape, a UMAP embedding, a sharpness estimate) report its
own steps under whatever bar the command shows, without knowing about it.
``stdout_to_stderr`` keeps what libraries print (Ray Tune's tables) off stdout
while a ``--json`` command runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
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


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Inside the block, whatever is written to stdout goes to stderr instead, at both levels:
    Python's ``sys.stdout`` (``print`` in a library) and file descriptor 1 (native code, and child
    processes started here, which keep the redirected descriptor after the block). Afterwards
    stdout is what it was, so ``--json`` prints its document alone there."""
    sys.stdout.flush()
    try:
        saved_fd = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no real descriptor 1 or 2 (an embedding host): Python level only
        saved_fd = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)
