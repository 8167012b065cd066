"""`demo --task lm` end to end at a tiny size: every row of the table, the reference scored against itself."""
from __future__ import annotations

import pytest

from sharp_unlearn.recipes.lm import TABLE_COLUMNS, LMDemoSettings, run_lm_demo


@pytest.mark.slow
def test_tiny_lm_demo_gives_every_row_and_column(tmp_path):
    settings = LMDemoSettings(subjects=12, forget_size=0.2, heldout_fraction=0.2, n_embd=16, n_layer=1,
                              pretrain_epochs=8, unlearn_epochs=1, optimizers=["adamw", "sam"])
    methods = {"grad_ascent": {}, "npo": {"alpha": 0.5, "beta": 0.1}, "sharp_minmax": {"alpha": 0.5}}
    result = run_lm_demo(settings, methods=methods, output_dir=str(tmp_path), tracking={"enabled": False},
                         log=lambda *_: None)
    cells = [(row["method"], row["unlearn_opt"]) for row in result.rows]
    assert cells == [("original", "-"), ("retrain", "adamw"),
                     *[(m, o) for m in ("grad_ascent", "npo") for o in ("adamw", "sam")],
                     # Sharp MinMax runs SAM on both sides whatever the base optimizer; the row says so
                     ("sharp_minmax", "sam-min/sam-max (adamw)"), ("sharp_minmax", "sam-min/sam-max (sam)")]
    for row in result.rows:
        assert set(TABLE_COLUMNS) <= set(row)
    reference = result.rows[1]
    assert reference["forget_quality"] == pytest.approx(1.0) and reference["tow"] == pytest.approx(1.0)
    assert result.markdown_path.read_text().count("\n") >= len(result.rows) + 2
