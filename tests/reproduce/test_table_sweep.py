"""`reproduce table --sweep`: the same trial budget per cell, each cell's best from its own trials,
the paper-code Sharp MinMax as a cell of its own, and where Sharp MinMax stands."""
from __future__ import annotations

import contextlib
import random
from types import SimpleNamespace

import pytest

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.reproduce.table import (
    PAPER_ENTRY,
    apply_tuned,
    fix_epochs,
    sharp_minmax_standing,
    tune_methods,
    with_paper_code,
)

PRESET = {"method": {"name": "sharp_minmax", "mask_order": "smallest", "forget_mask_scope": "perturbed",
                     "forget_perturbation": "full", "update_order": "sequential", "alpha": 0.99},
          "optimizer": {"name": "sam", "base": "adamw", "lr": 0.01}}


def _spec():
    return {"base": {"seed": 0, "data": {"name": "digits"}}, "forget": {"kind": "memorization", "size": 30},
            "levels": ["low", "high"], "unlearn_optimizers": ["sgd", "sam"], "unlearn": {"optimizer": {"lr": 0.02}},
            "methods": {"neggrad": {"epochs": 5, "alpha": 0.99},
                        "sharp_minmax": {"epochs": 5, "alpha": 0.99, "optimizers": ["sam"]}}}


@pytest.fixture
def fake_sweeps(monkeypatch):
    """Ray replaced by a recorder: each sweep's trials get random settings and ToW, seeded by its name."""
    seen = {}

    def parse_sweep(raw, tracking=None):
        return raw

    def run_sweep(raw, resume=False, quiet=False):
        rng = random.Random(raw["name"])
        rows = [{"optimizer.lr": rng.uniform(0.002, 0.1), "tow": rng.uniform(0.5, 1.0)}
                for _ in range(raw["num_samples"])]
        seen[raw["name"]] = {"raw": raw, "rows": rows}
        return SimpleNamespace(rows=rows, best=max(rows, key=lambda r: r["tow"]))

    monkeypatch.setattr("sharp_unlearn.reproduce.table.parse_sweep", parse_sweep)
    monkeypatch.setattr("sharp_unlearn.reproduce.table.run_sweep", run_sweep)
    monkeypatch.setattr("sharp_unlearn.reproduce.table.ray_session", lambda **kwargs: contextlib.nullcontext())
    return seen


def test_every_cell_gets_the_same_budget_and_its_own_best(fake_sweeps, tmp_path, monkeypatch):
    monkeypatch.setattr("sharp_unlearn.reproduce.table.load_yaml", lambda name: PRESET)
    spec = fix_epochs(with_paper_code(_spec(), "preset"), 2)
    tuned = tune_methods(spec, seed=3, output_dir=str(tmp_path), tracking={"enabled": False}, quiet=True,
                         num_samples=4)
    assert set(tuned) == {"neggrad/sgd", "neggrad/sam", "sharp_minmax/sam", f"{PAPER_ENTRY}/sam"}
    assert len(fake_sweeps) == 4
    for sweep in fake_sweeps.values():
        raw = sweep["raw"]
        assert raw["num_samples"] == 4 and raw["method"]["epochs"] == 2  # the same budget for every cell
        assert raw["forget"]["level"] == "high" and raw["base"]["seed"] == 3
    by_cell = {found["sweep"]: found for found in tuned.values()}
    for name, sweep in fake_sweeps.items():
        own_best = max(sweep["rows"], key=lambda r: r["tow"])
        assert by_cell[name]["params"] == {"optimizer.lr": own_best["optimizer.lr"]}  # not another cell's best
        assert by_cell[name]["tow"] == own_best["tow"] and by_cell[name]["trials"] == 4
    paper = next(s["raw"] for s in fake_sweeps.values() if s["raw"]["method"].get("update_order"))
    assert paper["method"]["mask_order"] == "smallest" and paper["method"]["alpha"] == 0.99
    assert paper["unlearn"]["optimizer"] == {"lr": 0.01, "base": "adamw", "name": "sam"}
    # the tuned grid: one entry per cell, the paper-code entry kept apart from the project's
    grid_spec = apply_tuned({**spec, "tuned": {c: f["params"] for c, f in tuned.items()}})
    assert set(grid_spec["methods"]) == {"neggrad@sgd", "neggrad@sam", "sharp_minmax", PAPER_ENTRY}
    assert grid_spec["methods"]["neggrad@sam"]["optimizer"]["lr"] == tuned["neggrad/sam"]["params"]["optimizer.lr"]
    assert grid_spec["methods"][PAPER_ENTRY]["optimizer"] == {
        "base": "adamw", "lr": tuned[f"{PAPER_ENTRY}/sam"]["params"]["optimizer.lr"]}


def test_budget_values_are_checked():
    with pytest.raises(ConfigError, match="--epochs=0"):
        fix_epochs(_spec(), 0)
    with pytest.raises(ConfigError, match="--trials=0"):
        tune_methods(_spec(), 0, "out", {}, True, num_samples=0)


def _rows(method, opt, tows, level="high", pretrain="sgd"):
    return [{"seed": s, "level": level, "pretrain": pretrain, "method": method, "unlearn_opt": opt, "tow": t}
            for s, t in enumerate(tows)]


def test_standing_says_where_sharp_minmax_is_best_and_by_how_much_it_is_not():
    rows = (_rows("neggrad", "sam", [0.90, 0.92, 0.94]) + _rows("sharp_minmax", "sam-min/sam-max", [0.80, 0.83, 0.83])
            + _rows("sharp_minmax[paper_code]", "sam-min/sam-max", [0.85, 0.86, 0.90])
            + _rows("neggrad", "sam", [0.7, 0.7, 0.7], level="low")
            + _rows("sharp_minmax", "sam-min/sam-max", [0.8, 0.9, 0.85], level="low")
            + _rows("original", "-", [0.1, 0.1, 0.1]))
    low, high = sharp_minmax_standing(rows)
    assert low.startswith("low, pretrain sgd: Sharp MinMax is best") and "next: neggrad (sam) 0.700" in low
    assert high.startswith("high, pretrain sgd: Sharp MinMax is NOT best: neggrad (sam)")
    # against the best Sharp MinMax cell (paper code here): differences 0.05, 0.06, 0.04
    assert "sharp_minmax[paper_code] (sam-min/sam-max), by +0.050 ± 0.025 ToW" in high
    assert "significant" in high and "not significant" not in high
