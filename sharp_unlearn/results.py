"""Result tables in the long format users query (the README's "Names users query").

One row per (run_id, method, optimizer, dataset, forget_set, seed, split,
metric, value), written as Parquet with pyarrow.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sharp_unlearn.files import atomic_path

SCHEMA = pa.schema([
    ("run_id", pa.string()), ("method", pa.string()), ("optimizer", pa.string()),
    ("dataset", pa.string()), ("forget_set", pa.string()), ("seed", pa.int64()),
    ("split", pa.string()), ("metric", pa.string()), ("value", pa.float64()),
])

#: metric name -> the split it describes, for metrics logged with flat names
SPLIT_OF = {"retain_acc": "retain", "forget_acc": "forget", "val_acc": "val", "test_acc": "test",
            "train_acc": "train"}


def rows_from_metrics(metrics: Mapping[str, float], *, run_id: str | None, method: str, optimizer: str,
                      dataset: str, forget_set: str, seed: int,
                      splits: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Long rows from a flat ``{metric: value}`` map; ``splits`` overrides the split per metric."""
    rows = []
    for metric, value in metrics.items():
        if value is None:
            continue
        split = (splits or {}).get(metric) or SPLIT_OF.get(metric, "all")
        rows.append({"run_id": run_id or "", "method": method, "optimizer": optimizer, "dataset": dataset,
                     "forget_set": forget_set, "seed": int(seed), "split": split, "metric": metric,
                     "value": float(value)})
    return rows


def write_results(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    table = pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in rows], schema=SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_results(path: str | os.PathLike) -> pa.Table:
    return pq.read_table(path)
