"""A tiny end-to-end reproduction table (held-out scores, one seed, one level)."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from sharp_unlearn.reproduce.table import run_table


@pytest.mark.slow
def test_tiny_table_end_to_end(tmp_path):
    overrides = ["memorization.num_models=4", "memorization.executor=serial", "memorization.config.train.epochs=8",
                 "base.train.epochs=15", "levels=[high]", "forget.size=30",
                 "base.model.options={width: 8, feature_dim: 32}"]
    result = run_table(output_dir=str(tmp_path), seeds=[0], tracking={"enabled": False}, methods=["neggrad"],
                       overrides=overrides)
    summary = pq.read_table(result["summary"]).to_pylist()
    methods = {(s["pretrain"], s["method"], s["unlearn_opt"]) for s in summary}
    assert {("sgd", "original", "-"), ("sgd", "retrain", "-"), ("sgd", "neggrad", "sgd"),
            ("sam", "neggrad", "sam")} <= methods
    assert all(0.0 <= s["tow"] <= 1.0 for s in summary)
    assert any("mia_efficacy" in s for s in summary)
    report = open(result["report_md"]).read()
    assert "SAM against SGD" in report and "memorization high" in report
    html = open(result["report_html"]).read()
    assert "data:image/png;base64," in html
