"""`sharp-unlearn reproduce lm`: the LM demo once per seed, summarized per (method, optimizer) cell."""
from __future__ import annotations

import json

import pytest

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.reproduce.lm_table import render_lm_markdown, run_lm_table, summarize_lm
from sharp_unlearn.stats import mean_ci95

TINY = ["subjects=12", "forget_size=0.2", "heldout_fraction=0.2", "n_embd=16", "n_layer=1", "pretrain_epochs=4",
        "unlearn_epochs=1", "threads=1"]


def test_summary_is_mean_and_ci_per_cell_over_seeds():
    rows = [{"method": "npo", "unlearn_opt": "sam", "seed": s, "forget_quality": q, "tow": t}
            for s, q, t in [(0, 0.1, 0.5), (1, 0.3, 0.7), (2, 0.2, float("nan"))]]
    rows.append({"method": "npo", "unlearn_opt": "adamw", "seed": 0, "forget_quality": 0.4})
    summary = summarize_lm(rows)
    assert [(s["method"], s["unlearn_opt"], s["seeds"]) for s in summary] == [("npo", "sam", 3), ("npo", "adamw", 1)]
    assert (summary[0]["forget_quality"], summary[0]["forget_quality_ci95"]) == mean_ci95([0.1, 0.3, 0.2])
    assert (summary[0]["tow"], summary[0]["tow_ci95"]) == mean_ci95([0.5, 0.7])  # NaN seeds are left out
    assert summary[1]["forget_quality_ci95"] is None  # one seed: no interval
    table = render_lm_markdown(summary, [0, 1, 2])
    assert "| npo | sam | 0.200 ± " in table and "| npo | adamw | 0.400 |" in table


def test_seed_is_not_an_override(tmp_path):
    with pytest.raises(ConfigError, match="--seeds"):
        run_lm_table(output_dir=str(tmp_path), seeds=[0], overrides=["seed=3"])


def test_image_table_flags_are_refused(tmp_path, capsys):
    from sharp_unlearn.cli import main

    assert main(["reproduce", "lm", "--root", "/data", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--root is not valid with reproduce lm" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_lm_runs_every_seed_and_writes_the_table(tmp_path, capsys):
    from sharp_unlearn.cli import main

    out = tmp_path / "lm"
    code = main(["reproduce", "lm", "--seeds", "0,1", "--methods", "grad_ascent", "--no-tracking",
                 "--output-dir", str(out), *TINY])
    printed = capsys.readouterr().out
    assert code == 0
    assert "Language-model unlearning table (seeds 0, 1)" in printed
    rows = json.loads((out / "lm_rows.json").read_text())
    assert sorted({r["seed"] for r in rows}) == [0, 1] and len(rows) == 2 * 4  # original, retrain, 2 optimizers
    summary = json.loads((out / "lm_summary.json").read_text())
    cells = [(s["method"], s["unlearn_opt"]) for s in summary]
    assert cells == [("original", "-"), ("retrain", "adamw"), ("grad_ascent", "adamw"), ("grad_ascent", "sam")]
    assert all(s["seeds"] == 2 for s in summary)
    ascent = summary[2]
    by_seed = [r["forget_quality"] for r in rows if (r["method"], r["unlearn_opt"]) == ("grad_ascent", "adamw")]
    assert (ascent["forget_quality"], ascent["forget_quality_ci95"]) == pytest.approx(mean_ci95(by_seed))
    assert summary[1]["forget_quality"] == pytest.approx(1.0)  # the reference against itself, every seed
    assert (out / "seed-0" / "lm_demo_results.md").is_file() and (out / "seed-1" / "lm_demo_results.md").is_file()
