"""The main job on the embedded default: pretrain (SGD, SAM), unlearn with every method, ToW table.

Driven by a grid spec (``configs/experiments/demo_digits.yaml``, format in
:mod:`sharp_unlearn.recipes.grid`): one seed, one hard forget set. Every step
is a tracked run; the table is written to Parquet (long format) and Markdown.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sharp_unlearn.recipes.grid import load_spec, markdown_table, run_grid, write_long

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
    grid = run_grid(spec, output_dir=output_dir, tracking=tracking, methods=methods, quiet=quiet)
    out = Path(output_dir)
    results_path = write_long(grid.long_rows, out / "demo_results.parquet")
    markdown_path = out / "demo_results.md"
    markdown_path.write_text(markdown_table(grid.rows, TABLE_COLUMNS))
    evaluation = _evaluate_pretrained(spec, output_dir, tracking, quiet) if evaluate and spec.get("evaluate") else []
    return DemoResult(grid.rows, results_path, markdown_path, grid.long_rows, evaluation)


def _evaluate_pretrained(spec, output_dir, tracking, quiet) -> list[dict[str, Any]]:
    """MIA / entanglement / sharpness of the SGD and SAM pretrained models on the demo's forget set."""
    try:
        from sharp_unlearn.evaluation import evaluate_checkpoint
    except ImportError:  # the evaluation suite is not installed in this build
        return []
    from sharp_unlearn.config import config_from_dict, merge
    from sharp_unlearn.recipes.pretrain import stage_dir

    rows = []
    for pre_opt in spec["pretrain_optimizers"]:
        cfg = config_from_dict(merge(spec["base"], {"output_dir": output_dir, "tracking": tracking or {},
                                                    "optimizer": {"name": pre_opt}}))
        checkpoint = stage_dir(cfg, "pretrain") / "checkpoint.pt"
        metrics = evaluate_checkpoint(checkpoint, metrics=spec["evaluate"], forget=spec["forget"],
                                      out_dir=Path(output_dir) / f"evaluate-{pre_opt}", tracking=tracking,
                                      quiet=quiet)
        rows.append({"pretrain": pre_opt, **metrics})
    return rows
