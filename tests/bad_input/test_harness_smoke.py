"""The harness itself: a known bad override is exit 2, one line, nothing written."""
from __future__ import annotations

from bad_input.harness import assert_exit_2_one_line, run_cli, snapshot


def test_unknown_optimizer_is_one_line_and_writes_nothing(tmp_path):
    before = snapshot(tmp_path)
    proc = run_cli(["pretrain", "--no-tracking", f"output_dir={tmp_path / 'runs'}", "optimizer.name=lbfgs"], tmp_path)
    assert_exit_2_one_line(proc, "pretrain", "optimizer.name='lbfgs'")
    assert snapshot(tmp_path) == before
