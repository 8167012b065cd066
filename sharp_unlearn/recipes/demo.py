"""The main job on the embedded default: pretrain (SGD, SAM), unlearn with every method, ToW table.

Driven by a small YAML spec (``configs/experiments/demo_digits.yaml``):
``base`` is the pretraining ExperimentConfig, ``pretrain_optimizers`` and
``unlearn_optimizers`` the optimizers crossed, ``methods`` the method
overrides, ``forget`` the forget set. Every step is a tracked run; the table
is written to Parquet (long format) and Markdown.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sharp_unlearn.config import config_from_dict, load_yaml, merge, parse_override
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.methods import METHODS
from sharp_unlearn.results import write_results

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


def load_spec(path: str | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    spec = load_yaml(path or DEFAULT_SPEC)
    for text in overrides:
        keys, value = parse_override(text)
        node: dict[str, Any] = {}
        cursor = node
        for key in keys[:-1]:
            cursor = cursor.setdefault(key, {})
        cursor[keys[-1]] = value
        spec = merge(spec, node)
    for key in ("base", "forget", "pretrain_optimizers", "unlearn_optimizers"):
        if key not in spec:
            raise ConfigError(f"demo spec lacks {key!r}; expected keys base, forget, pretrain_optimizers, "
                              "unlearn_optimizers, unlearn, methods")
    return spec


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else (f"{v:.2f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run_demo(spec_path: str | None = None, overrides: Sequence[str] = (), *, output_dir: str = "runs",
             tracking: dict[str, Any] | None = None, methods: Sequence[str] | None = None,
             quiet: bool = False, evaluate: bool = True) -> DemoResult:
    from sharp_unlearn.recipes.pretrain import train_from_scratch
    from sharp_unlearn.recipes.unlearn import load_pretrained, run_unlearning, unlearn_config

    spec = load_spec(spec_path, overrides)
    base_tree = merge(spec["base"], {"output_dir": output_dir, "tracking": tracking or {}})
    wanted = dict(spec.get("methods") or {name: {} for name in METHODS.names()})
    if methods:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            METHODS.get(unknown[0])  # raises listing the known names
        wanted = {m: wanted.get(m, {}) for m in methods}
    wanted = {m: o for m, o in wanted.items() if m in METHODS and m != "retrain"}

    table: list[dict[str, Any]] = []
    long_rows: list[dict[str, Any]] = []
    evaluations: list[dict[str, Any]] = []
    out = Path(output_dir)
    for pre_opt in spec["pretrain_optimizers"]:
        pre_cfg = config_from_dict(merge(base_tree, {"optimizer": {"name": pre_opt}}))
        outcome = train_from_scratch(pre_cfg, quiet=quiet)
        pretrained = load_pretrained(outcome.checkpoint)
        split = None
        for method_name, method_over in wanted.items():
            for un_opt in spec["unlearn_optimizers"]:
                tree = unlearn_config(pretrained)
                tree = merge(tree, copy.deepcopy(spec.get("unlearn", {})))
                tree = merge(tree, {"optimizer": {"name": un_opt}, "forget": copy.deepcopy(spec["forget"]),
                                    "method": {"name": method_name, **method_over},
                                    "output_dir": output_dir, "tracking": tracking or {}})
                cfg = config_from_dict(tree)
                result = run_unlearning(cfg, outcome.checkpoint, quiet=quiet, pretrained=pretrained, split=split)
                split = result.split  # one selection per pretrained model, shared by all methods
                if not any(r["pretrain"] == pre_opt and r["method"] == "original" for r in table):
                    table.append({"pretrain": pre_opt, "method": "original", "unlearn_opt": "-",
                                  **result.original_metrics, "wall_seconds": 0.0})
                    table.append({"pretrain": pre_opt, "method": "retrain", "unlearn_opt": "-",
                                  **result.reference.metrics, "tow": 1.0})
                table.append({"pretrain": pre_opt, "method": method_name, "unlearn_opt": result.optimizer_tag,
                              **result.metrics})
                from sharp_unlearn.results import read_results

                for row in read_results(result.results_path).to_pylist():
                    if row["method"] in ("original", "retrain"):
                        if any(r["method"] == row["method"] and r["run_id"] == row["run_id"] and
                               r["metric"] == row["metric"] for r in long_rows):
                            continue
                    long_rows.append({**row, "pretrain_optimizer": pre_opt})
        if evaluate and spec.get("evaluate"):
            evaluations.extend(_evaluate_pair(pretrained, split, spec["evaluate"], out, quiet))
    results_path = write_results(long_rows, out / "demo_results.parquet")
    markdown = markdown_table(table, TABLE_COLUMNS)
    markdown_path = out / "demo_results.md"
    markdown_path.write_text(markdown)
    return DemoResult(table, results_path, markdown_path, long_rows, evaluations)


def _evaluate_pair(pretrained, split, metric_names, out_dir: Path, quiet: bool) -> list[dict[str, Any]]:
    """MIA / entanglement / sharpness of the pretrained model on the demo's split (SGD vs SAM)."""
    try:
        from sharp_unlearn.evaluation import evaluate_model
    except ImportError:  # the evaluation suite is an optional part of the demo
        return []
    metrics = evaluate_model(pretrained.model("cpu"), pretrained.bundle, split, metric_names,
                             out_dir=out_dir / f"eval-{pretrained.cfg.optimizer.tag}", quiet=quiet)
    return [{"pretrain": pretrained.cfg.optimizer.tag, **metrics}]
