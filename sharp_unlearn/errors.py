"""Error types the CLI maps to exit codes.

``ConfigError`` (bad input: unknown names, out-of-range values, missing files)
exits with code 2 and a one-line message; anything else is a failure (exit 1).
It subclasses ``ValueError`` so library users can catch either.
"""


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


_termination = {"requested": False}


def note_termination() -> None:
    """Record that SIGTERM / Ctrl-C arrived (signal handlers call this before unwinding)."""
    _termination["requested"] = True


def termination_requested() -> bool:
    """True once a termination was requested: an error raised while unwinding from it (e.g. by
    a Ray task cancelled under our feet) is part of the interruption, not a failure."""
    return _termination["requested"]


def require(module: str, extra: str):
    """Import ``module`` lazily, or raise MissingExtra naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtra(module.split(".")[0], extra) from exc
