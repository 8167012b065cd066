"""``sharp-unlearn reproduce lm``: the language-model table over seeds, mean ± 95 % CI.

Each seed is one run of the LM demo (:func:`sharp_unlearn.recipes.lm.run_lm_demo`: its own fictitious
people, split, pretrained model and reference, every method with AdamW and SAM); the table summarizes
each (method, unlearning optimizer) cell over the seeds with :func:`sharp_unlearn.stats.mean_ci95`.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.files import atomic_write
from sharp_unlearn.recipes.lm import DEFAULT_METHODS, run_lm_demo, settings_from_overrides
from sharp_unlearn.stats import fmt_mean_ci, mean_ci95

#: what the LM table summarizes per cell (columns of the demo's table)
LM_SUMMARY_METRICS = ("forget_quality", "model_utility", "forget_rouge_l", "retain_rouge_l", "mia_auc_loss",
                      "tow", "forget_gap", "wall_seconds")


def summarize_lm(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and 95 % CI half-width over seeds per (method, unlearn_opt), in the order the rows first appear."""
    cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for metric in LM_SUMMARY_METRICS:
            value = row.get(metric)
            if isinstance(value, (int, float)) and value == value:
                cells[(row["method"], row["unlearn_opt"])][metric].append(float(value))
    out = []
    for (method, opt), metrics in cells.items():
        entry: dict[str, Any] = {"method": method, "unlearn_opt": opt, "seeds": 0}
        for metric, values in metrics.items():
            entry[metric], entry[f"{metric}_ci95"] = mean_ci95(values)
            entry["seeds"] = max(entry["seeds"], len(values))
        out.append(entry)
    return out


def render_lm_markdown(summary: Sequence[dict[str, Any]], seeds: Sequence[int]) -> str:
    lines = [f"# Language-model unlearning table (seeds {', '.join(map(str, seeds))})", "",
             "Mean ± 95 % CI over seeds. `forget_quality`: KS p-value of truth ratios against the retrained "
             "reference (1 = indistinguishable); `model_utility`: retain and world questions; `tow` / "
             "`forget_gap`: answer-token accuracies against the reference. `original` is the pretrained model, "
             "`retrain` the reference itself.", "",
             "| " + " | ".join(["method", "unlearn", *LM_SUMMARY_METRICS]) + " |",
             "|" + "---|" * (2 + len(LM_SUMMARY_METRICS))]
    for s in summary:
        cells = [fmt_mean_ci(s.get(m), s.get(f"{m}_ci95"), 2 if m in ("forget_gap", "wall_seconds") else 3)
                 for m in LM_SUMMARY_METRICS]
        lines.append("| " + " | ".join([s["method"], s["unlearn_opt"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def run_lm_table(*, output_dir: str = "runs/reproduce-lm", seeds: Sequence[int] | None = None,
                 methods: Sequence[str] | None = None, overrides: Sequence[str] = (),
                 tracking: dict[str, Any] | None = None, quiet: bool = True) -> dict[str, Any]:
    """The LM demo once per seed (``overrides``: the demo's key=value settings), then the summary table."""
    seeds = list(seeds or [0, 1, 2])
    if any(item.partition("=")[0] == "seed" for item in overrides):
        raise ConfigError("seed=... is not an LM table override; expected --seeds (every seed is its own run)")
    chosen = dict(DEFAULT_METHODS)
    if methods:
        chosen = {m: DEFAULT_METHODS.get(m, {}) for m in methods}
    out = Path(output_dir)
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        settings = settings_from_overrides([*overrides, f"seed={seed}"])
        result = run_lm_demo(settings, methods=chosen, output_dir=str(out / f"seed-{seed}"), tracking=tracking,
                             log=(lambda *_: None) if quiet else print)
        rows += [{**row, "seed": seed} for row in result.rows]
    summary = summarize_lm(rows)
    rows_path = atomic_write(out / "lm_rows.json", json.dumps(rows, indent=2, default=float))
    summary_path = atomic_write(out / "lm_summary.json", json.dumps(summary, indent=2, default=float))
    report = atomic_write(out / "lm_report.md", render_lm_markdown(summary, seeds))
    return {"rows": str(rows_path), "summary": str(summary_path), "report_md": str(report), "seeds": seeds}
