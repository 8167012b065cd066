"""Short terminal tables (rich) for command results.

Tables take the terminal's width as rich detects it (``$COLUMNS`` wins; a file
or pipe without it gets 160 columns) and wrap cell text rather than running past it.
Each numeric column has one format for all its rows, chosen by the column's
name (accuracies in percent: 2 decimals, ToW and scores: 4) or, for other
columns, by the largest value in it.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

#: formats by column name; the first matching rule wins
#: width of tables written to a file or pipe (no terminal to fit; COLUMNS still wins)
_PIPE_WIDTH = 160

_NAMED_FORMATS: tuple[tuple[str, str], ...] = (
    ("wall_seconds", "{:.1f}"),
    ("seconds", "{:.1f}"),
    ("_acc", "{:.2f}"),  # accuracies are percentages (0-100)
    ("acc_", "{:.2f}"),
    ("tow", "{:.4f}"),
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def column_format(name: str, values: Sequence[Any]) -> str | None:
    """The one format of a column's floats, or None when it holds no floats."""
    floats = [v for v in values if isinstance(v, float)]
    if not floats:
        return None
    for needle, fmt in _NAMED_FORMATS:
        if name == needle or needle in name:
            return fmt
    finite = [abs(v) for v in floats if math.isfinite(v)]
    # a column of small numbers (ToW-like scores, MIA, sharpness) keeps 4 decimals; larger ones 2
    return "{:.4f}" if not finite or max(finite) < 10 else "{:.2f}"


def _cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return ""
    if fmt is not None and _is_number(value):
        return fmt.format(float(value)) if isinstance(value, float) else str(value)
    return str(value)


def format_value(name: str, value: Any) -> str:
    """``value`` formatted as a column named ``name`` would show it."""
    return _cell(value, column_format(name, [value]))


def _console():
    from rich.console import Console

    # a terminal's own width (rich detects it, or reads $COLUMNS); output to a file or pipe has no width to
    # fit, and rich's 80-column fallback would fold every label there, so it gets whole lines
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=_PIPE_WIDTH)
    return console


def print_metrics(title: str, metrics: Mapping[str, Any]) -> None:
    """A key/value table; keys without a value (``run_id`` with tracking off) are left out, and an
    empty mapping prints nothing."""
    from rich.table import Table

    shown = {k: v for k, v in metrics.items() if v is not None}
    if not shown:
        return
    table = Table(title=title, show_header=True)
    table.add_column("key", overflow="fold")
    table.add_column("value", justify="right", overflow="fold")
    for key, value in shown.items():
        table.add_row(key, _cell(value, column_format(key, [value])))
    _console().print(table)


def print_rows(title: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """A table of ``rows`` (one format per column); nothing is printed when there are no rows."""
    from rich import box
    from rich.table import Table

    if not rows or not columns:
        return
    console = _console()
    cells, numeric = [], []
    for col in columns:
        values = [row.get(col) for row in rows]
        fmt = column_format(col, values)
        cells.append([_cell(v if v is not None else "", fmt) for v in values])
        numeric.append(any(_is_number(v) for v in values)
                       and all(v is None or v == "" or _is_number(v) for v in values))
    widths = [max(len(c) for c in column) for column in cells]
    headers = list(columns)
    # too wide with one-line headers: long names (entanglement_wasserstein) break at their underscores
    if sum(max(w, len(h)) + 2 for w, h in zip(widths, headers, strict=True)) > console.width:
        # (numbers' headers also break inside long parts: a column of 0.1234 is 6 wide, not 12)
        headers = [_wrap_header(h, max(w, 7) if n else w, hard=n)
                   for h, w, n in zip(headers, widths, numeric, strict=True)]
    # light borders: at 100 columns a 10-column table needs the space for its numbers
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    mins = [max(w, *(len(line) for line in h.splitlines())) for w, h in zip(widths, headers, strict=True)]
    # numbers and short labels (method names) stay whole while they fit; rich would otherwise crop
    # the last column to keep the width, so when they do not fit, texts fold, then numbers too
    keep = [n or w <= 16 for w, n in zip(widths, numeric, strict=True)]
    # each column costs its width + 2 (right padding, divider); a folding column at least 4
    if sum(m + 2 for m, k in zip(mins, keep, strict=True) if k) + 6 * keep.count(False) > console.width:
        keep = list(numeric)
        if sum(m + 2 for m, n in zip(mins, numeric, strict=True) if n) + 6 * keep.count(False) > console.width:
            keep = [False] * len(keep)
    for header, min_width, is_number, whole in zip(headers, mins, numeric, keep, strict=True):
        table.add_column(header, justify="right" if is_number else "left", overflow="fold", no_wrap=whole,
                         min_width=min_width if whole else None)
    for row in zip(*cells, strict=True):
        table.add_row(*row)
    console.print(table)


def _wrap_header(name: str, width: int, hard: bool = False) -> str:
    """``name`` on lines of at most ``width`` characters, broken after ``_``; a longer part is split
    too when ``hard``, else it sets the width."""
    parts = [p + "_" for p in name.split("_")]
    parts[-1] = parts[-1][:-1]
    if hard:
        parts = [p[i:i + width] for p in parts for i in range(0, len(p), width)]
    width = max(width, max(len(p) for p in parts))
    lines = [""]
    for part in parts:
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)
