"""``sharp-unlearn memorization`` from the command line (in-process executor; Ray in tests/integration)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from sharp_unlearn.cli import main
from sharp_unlearn.data.memorization import read_scores

COMMON = ["--no-tracking", "model.name=mlp", "model.options={hidden: [32]}", "train.epochs=3",
          "data.label_noise=0.05"]


def test_cli_writes_a_score_table_and_influence(tmp_path, capsys):
    out = tmp_path / "mem"
    code = main(["memorization", "--json", "--quiet", "--executor", "serial", "--models", "3", "--influence",
                 "--influence-top-k", "2", "--out", str(out), f"output_dir={tmp_path}", *COMMON])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["models_trained"] == 3 and result["models_reused"] == 0
    assert 0.0 <= result["flipped_auroc"] <= 1.0
    index, score = read_scores(result["scores"], num_examples=1257)
    assert index.tolist() == list(range(1257)) and np.isfinite(score).all()
    influence = pq.read_table(result["influence"])
    assert influence.num_rows == 360 * 2
    assert sorted(p.name for p in (out / "models").iterdir()) == [f"model-{k:05d}.npz" for k in range(3)]

    # the same command again trains nothing
    assert main(["memorization", "--json", "--quiet", "--executor", "serial", "--models", "3", "--out", str(out),
                 f"output_dir={tmp_path}", *COMMON]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["models_trained"] == 0 and again["models_reused"] == 3
    assert "models_per_minute" not in again


def test_cli_proxies_only(tmp_path, capsys):
    code = main(["memorization", "--json", "--quiet", "--proxies-only", "--proxies", "learning_speed,loss",
                 f"output_dir={tmp_path}", *COMMON])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    table = pq.read_table(result["scores"])
    assert {"index", "score", "proxy_learning_speed", "proxy_loss"} <= set(table.column_names)
    np.testing.assert_array_equal(table.column("score").to_numpy(), table.column("proxy_learning_speed").to_numpy())
    assert "flipped_auroc_loss" in result


@pytest.mark.parametrize("argv, message", [
    (["--models", "1"], "models=1"),
    (["--subset-fraction", "1.5"], "subset_fraction=1.5"),
    (["data.name=nope"], "unknown data set 'nope'"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    code = main(["memorization", "--executor", "serial", f"output_dir={tmp_path}", *COMMON, *argv])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_rejects_unknown_proxy_names(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["memorization", "--proxies", "margin", f"output_dir={tmp_path}"])
    assert exc.value.code == 2
    assert "expected 'all' or a comma list" in capsys.readouterr().err


def test_cli_bad_model_options_fail_before_any_training(tmp_path, capsys):
    code = main(["memorization", "--executor", "serial", "--out", str(tmp_path / "m"), f"output_dir={tmp_path}",
                 *COMMON, "model.options={depth: 3}"])
    assert code == 2
    assert "rejected its options" in capsys.readouterr().err
    assert not (tmp_path / "m" / "models").exists()
