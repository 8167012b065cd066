"""The main job on the embedded default: pretrain (SGD, SAM), unlearn with every method, ToW table.

Driven by a grid spec (``configs/experiments/demo_digits.yaml``, format in
:mod:`sharp_unlearn.recipes.grid`): one seed, one hard forget set. Every step
is a tracked run, a child of one ``kind=demo`` parent run that carries the ToW
table (an MLflow table the UI previews, and CSV) and its figure; the table is
also written to Parquet (long format) and Markdown.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharp_unlearn.config import merge
from sharp_unlearn.markdown import fmt_result, markdown_table
from sharp_unlearn.recipes.grid import load_spec, model_evaluator, run_grid, write_long
from sharp_unlearn.tracking import children_of, tracked_run
from sharp_unlearn.validation import config_from_dict

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
    with parent_run(spec, output_dir, tracking, "demo", "demo") as parent:
        grid = run_grid(spec, output_dir=output_dir, tracking=tracking, methods=methods, quiet=quiet,
                        evaluator=evaluator)
        results_path = write_long(grid.long_rows, out / "demo_results.parquet")
        markdown_path = out / "demo_results.md"
        markdown_path.write_text(results_markdown(grid.rows, grid.evaluation))
        log_grid_summary(parent, grid.rows, grid.evaluation, "demo")
        parent.log_artifact(results_path, "results")
        parent.log_artifact(markdown_path, "results")
    return DemoResult(grid.rows, results_path, markdown_path, grid.long_rows, grid.evaluation)


def results_markdown(rows: Sequence[dict[str, Any]], evaluation: Sequence[dict[str, Any]] = ()) -> str:
    """The ToW table (one row per pretraining x method x unlearning optimizer), then the evaluation
    table when there is one (its columns in first-seen order, without seed and level)."""
    text = markdown_table(TABLE_COLUMNS, rows, cell=fmt_result)
    if evaluation:
        columns = list(dict.fromkeys(k for row in evaluation for k in row if k not in ("seed", "level")))
        text += "\n" + markdown_table(columns, evaluation, cell=fmt_result)
    return text


@contextlib.contextmanager
def parent_run(spec: dict[str, Any], output_dir: str, tracking: dict[str, Any] | None, kind: str,
               run_name: str) -> Iterator[Any]:
    """One parent run (``kind`` demo / reproduce) with every stage opened inside it as a child.

    Yields its tracker (a NullTracker when tracking is off); the grid spec is its ``config.yaml``.
    """
    import yaml

    cfg = config_from_dict(merge(spec["base"], {"output_dir": output_dir, "tracking": dict(tracking or {})}))
    tags = {"dataset": cfg.data.name, "model": cfg.model.name, "seed": cfg.seed}
    with tracked_run(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment, kind=kind, tags=tags,
                     run_name=run_name, config_yaml=yaml.safe_dump(spec, sort_keys=False),
                     max_artifact_mb=cfg.tracking.max_artifact_mb, enabled=cfg.tracking.enabled) as tracker:
        with children_of(tracker.run_id):
            yield tracker


def log_grid_summary(tracker, rows: Sequence[dict[str, Any]], evaluation: Sequence[dict[str, Any]],
                     name: str) -> None:
    """The ToW table (MLflow table + CSV, mean over seeds) and a ToW figure on a parent run."""
    if tracker.run_id is None or not rows:
        return
    keys = ("pretrain", "level", "method", "unlearn_opt")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    extra = {}
    for row in evaluation:
        extra.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    table = []
    for key, members in groups.items():
        entry = dict(zip(keys, key))
        entry["seeds"] = len(members)
        for metric in ("retain_acc", "forget_acc", "test_acc", "tow", "wall_seconds"):
            values = [float(m[metric]) for m in members if isinstance(m.get(metric), (int, float))]
            entry[metric] = sum(values) / len(values) if values else None
        for metric in sorted({k for m in extra.get(key, []) for k in m if k not in (*keys, "seed")}):
            values = [float(m[metric]) for m in extra[key] if isinstance(m.get(metric), (int, float))]
            entry[metric] = sum(values) / len(values) if values else None
        table.append(entry)
    tracker.log_preview_table(table, f"tables/{name}_tow.json")
    figure = tow_figure(table)
    if figure is not None:
        tracker.log_figure(figure, f"{name}_tow.png")


def tow_figure(table: Sequence[dict[str, Any]]):
    """ToW per method / unlearning optimizer, one bar per pretraining optimizer (and forget level)."""
    cells = [r for r in table if r["method"] not in ("original", "retrain") and r.get("tow") is not None]
    if not cells:
        return None
    # a bare Figure, not pyplot: no global backend switch (a notebook's inline backend stays as it is)
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(f"{r['method']}/{r['unlearn_opt']}" for r in cells))
    series = list(dict.fromkeys((r["pretrain"], r["level"]) for r in cells))
    several_levels = len({level for _, level in series}) > 1
    width = 0.8 / len(series)
    fig = Figure(figsize=(min(4 + 0.6 * len(labels), 14), 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (pre, level) in enumerate(series):
        values = {f"{r['method']}/{r['unlearn_opt']}": r["tow"] for r in cells
                  if r["pretrain"] == pre and r["level"] == level}
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [values.get(label, float("nan")) for label in labels], width,
               label=f"pretrain {pre}" + (f", {level}" if several_levels else ""))
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize="small")
    ax.set_ylabel("ToW (1 = retrained)")
    ax.set_title("tug of war against the retrained reference")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return fig
