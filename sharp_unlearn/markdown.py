"""Markdown tables (GitHub flavour) for the result files of demo, reproduce, sweeps and ``compare``."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any


def fmt(value: Any, digits: int = 4) -> str:
    """A cell: None is empty, floats get ``digits`` decimals (one from 1000 on), NaN is ``nan``."""
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], *,
                   cell: Callable[[Any, str], str] | None = None) -> str:
    """One header row, one row per mapping (a missing key is an empty cell), ending in a newline.

    ``cell(value, column)`` turns a value into text (default: :func:`fmt`); ``|`` and line breaks in
    the text are escaped so a cell never splits the table.
    """
    def text(value: Any, column: str) -> str:
        shown = cell(value, column) if cell is not None else fmt(value)
        return shown.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(text(row.get(c), c) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt_result(value: Any, column: str | None = None) -> str:
    """A cell of the demo's and sweeps' result tables: 4 decimals below 10 (ToW, fractions), 2 from
    10 on (accuracies in percent, seconds); None is empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)
