"""The theory experiment: verdicts come from the numbers, and a small run measures the coefficients."""
from __future__ import annotations

import dataclasses

import pytest

from sharp_unlearn.reproduce.theory import TheorySpec, judge, run_theory


def _row(opt, alpha, s_norm, err, pre_noise_retain, pre_noise_forget, noise_forget):
    return {"optimizer": opt, "alpha": alpha, "signal_norm": s_norm, "test_error": err,
            "pretrain_noise_retain": pre_noise_retain, "pretrain_noise_forget": pre_noise_forget,
            "noise_forget": noise_forget}


def test_verdicts_follow_the_measurements():
    spec = TheorySpec(alpha_signal_norm=1.0, signal_alpha=0.5, error_threshold=10.0)
    rows = [_row("sgd", 0.5, 1.0, 30.0, 9.0, 9.0, 8.0), _row("sam", 0.5, 1.0, 2.0, 2.0, 2.0, 1.1),
            _row("sgd", 0.9, 1.0, 5.0, 9.0, 9.0, 8.9), _row("sam", 0.9, 1.0, 1.0, 2.0, 2.0, 1.9),
            _row("sgd", 0.5, 2.0, 3.0, 7.0, 7.0, 6.0), _row("sam", 0.5, 2.0, 0.0, 1.0, 1.0, 0.1)]
    held = [v["held"] for v in judge(rows, spec)]
    # SAM's retain noise is lower; forget-noise changes match (-0.55 vs -0.55 on average);
    # SAM is accurate from alpha 0.5, SGD only at 0.9; SAM at ||mu||=1, SGD only at 2
    assert held == [True, True, True, True]

    worse = [dict(r, pretrain_noise_retain=r["pretrain_noise_retain"] + (10 if r["optimizer"] == "sam" else 0))
             for r in rows]
    assert judge(worse, spec)[0]["held"] is False


@pytest.mark.slow
def test_small_theory_run_writes_report_and_measures_coefficients(tmp_path):
    spec = dataclasses.replace(TheorySpec(), signal_norms=(1.0, 2.0), alphas=(0.5, 0.9), unlearn_epochs=3)
    spec.base["train"]["epochs"] = 60
    result = run_theory(spec, output_dir=str(tmp_path), tracking={"enabled": False})
    rows = result["rows"]
    assert {r["optimizer"] for r in rows} == {"sgd", "sam"} and len(rows) == 2 * 3
    assert all(r["pretrain_noise_retain"] > 0 and r["signal"] != 0 for r in rows)
    assert len(result["verdicts"]) == 4
    report = (tmp_path / "theory.md").read_text()
    assert "held on this run" in report and (tmp_path / "theory.parquet").exists()
