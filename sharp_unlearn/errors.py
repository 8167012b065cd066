"""Error types the CLI maps to exit codes.

``ConfigError`` (bad input: unknown names, out-of-range values, missing files)
exits with code 2 and a one-line message; anything else is a failure (exit 1).
It subclasses ``ValueError`` so library users can catch either.
"""

import contextlib
from collections.abc import Iterator, Mapping


class ConfigError(ValueError):
    """User input is invalid. The message names the value and what was expected."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the input checkpoint is left untouched."""


class MissingExtra(ImportError):
    """A heavy optional dependency is not installed."""

    def __init__(self, package: str, extra: str):
        super().__init__(
            f"this feature needs the optional package {package!r}; "
            f"install it with: pip install 'sharp-unlearn[{extra}]'"
        )


_termination = {"requested": False, "pipe": None}


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (raised in the main thread by the CLI's handler). A KeyboardInterrupt
    subclass, so ``except Exception`` does not swallow it and it unwinds like Ctrl-C."""


def note_termination() -> None:
    """Record that SIGTERM / Ctrl-C arrived (signal handlers call this before unwinding)."""
    _termination["requested"] = True


def termination_requested() -> bool:
    """True once a termination was requested: an error raised while unwinding from it (e.g. by
    a Ray task cancelled under our feet) is part of the interruption, not a failure.

    Also true when the signal reached a handler someone else installed: ``ray.init`` replaces
    the SIGTERM handler with one calling ``sys.exit(15)``, Ray Tune and Ray Train take SIGINT
    while they run. CPython writes every caught signal's number to the wakeup pipe that
    :func:`watch_termination` sets up, whichever Python handler then runs, so it is read here.
    """
    pipe = _termination["pipe"]
    if not _termination["requested"] and pipe is not None:
        import os
        import signal

        try:
            while data := os.read(pipe[0], 4096):
                if signal.SIGTERM in data or signal.SIGINT in data:
                    _termination["requested"] = True
        except (BlockingIOError, OSError):  # empty (non-blocking) or already closed
            pass
    return _termination["requested"]


def raise_terminated(signum, frame):
    """The SIGTERM handler that unwinds like Ctrl-C: notes the termination, raises ``Terminated``."""
    note_termination()
    raise Terminated("SIGTERM")


_sigterm_handler = raise_terminated  # the name watch_termination installs


def note_only(signum, frame):
    """A handler that records the signal and returns (for code that must finish what it does)."""
    note_termination()


def _sigint_handler(signum, frame):
    note_termination()
    raise KeyboardInterrupt


class watch_termination:  # noqa: N801 - used like a function: ``with watch_termination():``
    """For the length of a command (the CLI wraps every command in it, in the main thread):
    SIGTERM unwinds like Ctrl-C (``Terminated``), so ``finally`` blocks shut Ray down and end
    MLflow runs KILLED; both signals are noted for :func:`termination_requested`. Restores the
    previous handlers and wakeup fd on exit. Outside the main thread it does nothing."""

    def __enter__(self):
        import os
        import signal
        import threading

        self._saved = None
        if threading.current_thread() is not threading.main_thread():
            return self
        _termination["requested"] = False
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._saved = (signal.signal(signal.SIGTERM, _sigterm_handler),
                       signal.signal(signal.SIGINT, _sigint_handler), previous_fd, (read_fd, write_fd))
        _termination["pipe"] = (read_fd, write_fd)
        return self

    def __exit__(self, *exc_info):
        import os
        import signal

        if self._saved is None:
            return False
        term, intr, previous_fd, pipe = self._saved
        termination_requested()  # drain the pipe while it is still ours
        # a handler installed from C reads back as None: the default is the closest match
        signal.signal(signal.SIGTERM, term if term is not None else signal.SIG_DFL)
        signal.signal(signal.SIGINT, intr if intr is not None else signal.default_int_handler)
        signal.set_wakeup_fd(previous_fd)
        _termination["pipe"] = None
        for fd in pipe:
            os.close(fd)
        return False


@contextlib.contextmanager
def handle_sigterm(handler=raise_terminated) -> Iterator[None]:
    """For the block, SIGTERM runs ``handler`` (default :func:`raise_terminated`: unwind like Ctrl-C,
    so ``finally`` blocks shut Ray down and end MLflow runs); ``signal.SIG_IGN`` holds it off while
    something must finish. The previous handler comes back on exit; one installed from C (Ray's)
    reads back as None and is replaced by the default. Outside the main thread (a Ray Tune function
    trainable) signals cannot be set, and it does nothing.

    Yields the handler it replaced (None outside the main thread), for a handler that hands a second
    SIGTERM on to it."""
    import signal

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield None
        return
    try:
        yield previous if previous is not None else signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def init_ray(ray, **kwargs) -> None:
    """``ray.init(**kwargs)`` without losing an interruption.

    ``ray.init`` replaces the SIGTERM handler with one calling ``sys.exit``, and a signal that
    arrives while it forks Ray's processes can run its handler inside an at-fork callback, where
    the exception is printed and dropped ("Exception ignored in ...") and the command would go on
    as if nothing happened. So the handler in place before is put back afterwards, and a
    termination noted meanwhile is raised here.
    """
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(**kwargs)
    except SystemExit:
        if termination_requested():
            raise Terminated("SIGTERM while Ray was starting") from None
        raise
    finally:
        if callable(previous):  # ours (or a tracked run's); a default/absent one keeps Ray's
            signal.signal(signal.SIGTERM, previous)
    if termination_requested():
        raise Terminated("SIGTERM while Ray was starting")


def require(module: str, extra: str):
    """Import ``module`` lazily, or raise MissingExtra naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtra(module.split(".")[0], extra) from exc


def shape_mismatch(expected: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]]) -> str | None:
    """What differs between two name -> shape tables (a model's and a file's), for a one-line
    error: up to three missing and unexpected names and the first shape that differs; None if
    they agree."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [k for k in expected if k in given and tuple(given[k]) != tuple(expected[k])]
    detail = []
    if missing:
        detail.append(f"missing {missing[:3]}")
    if unexpected:
        detail.append(f"unexpected {unexpected[:3]}")
    if mismatched:
        k = mismatched[0]
        detail.append(f"shape of {k}: {tuple(given[k])} vs model {tuple(expected[k])}")
    return "; ".join(detail) or None
