"""The reproduction table: aggregation over seeds, SAM-vs-SGD statements, speed-up, tuned settings."""
from __future__ import annotations

import math

import pytest

from sharp_unlearn.reproduce.table import apply_tuned, best_speedup, render_markdown, sam_vs_sgd, summarize


def _row(seed, pretrain, method, opt, tow, wall=1.0, level="high"):
    return {"seed": seed, "pretrain": pretrain, "level": level, "method": method, "unlearn_opt": opt,
            "tow": tow, "forget_acc": 10.0, "retain_acc": 99.0, "test_acc": 97.0, "wall_seconds": wall}


def test_summary_means_and_student_t_interval_over_seeds():
    rows = [_row(s, "sgd", "neggrad", "sgd", tow) for s, tow in enumerate([0.8, 0.9, 1.0])]
    evaluation = [{"seed": s, "pretrain": "sgd", "level": "high", "method": "neggrad", "unlearn_opt": "sgd",
                   "mia_efficacy": v} for s, v in enumerate([0.5, 0.6, 0.7])]
    (cell,) = summarize(rows, evaluation)
    assert cell["tow"] == pytest.approx(0.9)
    # sample sd 0.1, n=3: half-width = t(2) * 0.1 / sqrt(3) = 4.303 * 0.0577
    assert cell["tow_ci95"] == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-3)
    assert cell["mia_efficacy"] == pytest.approx(0.6)
    assert cell["seeds"] == 3


def test_statements_say_where_sam_does_not_beat_sgd():
    rows = [_row(0, "sgd", "neggrad", "sgd", 0.9), _row(0, "sgd", "neggrad", "sam", 0.8),
            _row(0, "sam", "neggrad", "sgd", 0.95)]
    lines = sam_vs_sgd(summarize(rows, []))
    assert any("unlearning with SAM does NOT beat SGD" in line and "0.800 vs 0.900" in line for line in lines)
    assert any("SAM pretraining beats SGD pretraining" in line and "0.950 vs 0.900" in line for line in lines)


def test_speedup_is_the_cheapest_run_reaching_the_tow_floor():
    rows = [_row(0, "sgd", "retrain", "-", 1.0, wall=20.0), _row(0, "sgd", "neggrad", "sgd", 0.95, wall=2.0),
            _row(0, "sgd", "finetune", "sgd", 0.97, wall=4.0), _row(0, "sgd", "grad_ascent", "sgd", 0.5, wall=0.1)]
    speed = best_speedup(summarize(rows, []))
    assert speed["method"] == "neggrad" and speed["speedup"] == pytest.approx(10.0)
    assert best_speedup(summarize([rows[0], rows[3]], [])) is None
    # where doing nothing already reaches ToW 0.9 the cell says nothing about unlearning
    assert best_speedup(summarize(rows + [_row(0, "sgd", "original", "-", 0.95, wall=0.0)], [])) is None
    text = render_markdown(summarize(rows, []), [], speed, "spec", [0])
    assert "**10.0x** cheaper" in text


def test_table_cells_show_mean_and_interval_and_leave_missing_values_empty():
    rows = [_row(s, "sgd", "neggrad", "sgd", tow, wall=wall)
            for s, tow, wall in [(0, 0.8, 1.0), (1, 0.9, 2.0), (2, 1.0, 3.0)]]
    rows.append({**_row(0, "sgd", "original", "-", 0.1), "forget_acc": float("nan")})
    del rows[-1]["wall_seconds"]  # e.g. a cell that was only evaluated
    text = render_markdown(summarize(rows, []), [], None, "spec", [0, 1, 2])
    original = next(line for line in text.splitlines() if line.startswith("| sgd | original |"))
    neggrad = next(line for line in text.splitlines() if line.startswith("| sgd | neggrad |"))
    assert original == "| sgd | original | - | 0.100 |  | 99.000 | 97.000 |  |  |  |"  # no "nan" for what is missing
    assert neggrad.startswith("| sgd | neggrad | sgd | 0.900 ± 0.248 | 10.000 ± 0.000 |") and neggrad.endswith(
        "| 2.00 |")


def test_tuned_settings_become_one_grid_entry_per_optimizer():
    spec = {"unlearn_optimizers": ["sgd", "sam"],
            "methods": {"neggrad": {"alpha": 0.9, "optimizer": {"lr": 0.02}}, "sharp_minmax": {"optimizers": ["sam"]}},
            "tuned": {"neggrad/sgd": {"optimizer.lr": 0.01, "method.alpha": 0.95},
                      "sharp_minmax/sam": {"method.rho_max": 0.1}}}
    methods = apply_tuned(spec)["methods"]
    assert methods["neggrad@sgd"] == {"alpha": 0.95, "optimizer": {"lr": 0.01}, "optimizers": ["sgd"]}
    assert methods["neggrad@sam"] == {"alpha": 0.9, "optimizer": {"lr": 0.02}, "optimizers": ["sam"]}
    assert methods["sharp_minmax"] == {"rho_max": 0.1, "optimizers": ["sam"]}
