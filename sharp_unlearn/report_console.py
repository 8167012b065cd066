"""Short terminal tables (rich) for command results."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def print_metrics(title: str, metrics: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True)
    table.add_column("key")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, _fmt(value))
    Console().print(table)


def print_rows(title: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right" if rows and isinstance(rows[0].get(col), float) else "left")
    for row in rows:
        table.add_row(*[_fmt(row.get(col, "")) for col in columns])
    Console(width=200).print(table)
