"""The main job on the embedded default: pretrain (SGD, SAM), unlearn with every method, ToW table.

Driven by a grid spec (``configs/experiments/demo_digits.yaml``, format in
:mod:`sharp_unlearn.recipes.grid`): one seed, one hard forget set. Every step
is a tracked run; the table is written to Parquet (long format) and Markdown.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharp_unlearn.recipes.grid import load_spec, markdown_table, model_evaluator, run_grid, write_long

DEFAULT_SPEC = "demo_digits"
TABLE_COLUMNS = ["pretrain", "method", "unlearn_opt", "retain_acc", "forget_acc", "test_acc", "tow",
                 "wall_seconds"]


@dataclass
class DemoResult:
    rows: list[dict[str, Any]]
    results_path: Path
    markdown_path: Path
    long_rows: list[dict[str, Any]] = field(default_factory=list)
    evaluation: list[dict[str, Any]] = field(default_factory=list)


def run_demo(spec_path: str | None = None, overrides: Sequence[str] = (), *, output_dir: str = "runs",
             tracking: dict[str, Any] | None = None, methods: Sequence[str] | None = None,
             quiet: bool = False, evaluate: bool = True) -> DemoResult:
    spec = load_spec(spec_path, DEFAULT_SPEC, overrides)
    out = Path(output_dir)
    evaluator = None
    if evaluate and spec.get("evaluate"):
        try:
            evaluator = model_evaluator(spec["evaluate"], out / "evaluation", seed=int(spec["base"].get("seed", 0)))
        except ImportError:  # the analysis extra (POT) is missing: the demo still runs, without those columns
            evaluator = None
    grid = run_grid(spec, output_dir=output_dir, tracking=tracking, methods=methods, quiet=quiet,
                    evaluator=evaluator)
    results_path = write_long(grid.long_rows, out / "demo_results.parquet")
    markdown_path = out / "demo_results.md"
    text = markdown_table(grid.rows, TABLE_COLUMNS)
    if grid.evaluation:
        columns = list(dict.fromkeys(k for row in grid.evaluation for k in row if k not in ("seed", "level")))
        text += "\n" + markdown_table(grid.evaluation, columns)
    markdown_path.write_text(text)
    return DemoResult(grid.rows, results_path, markdown_path, grid.long_rows, grid.evaluation)
