"""Bad input to the consistency features: packaged grid specs in run commands, `config show`,
`evaluate` without a checkpoint. Exit 2, one line, nothing written."""
from __future__ import annotations

import pytest

from bad_input.harness import assert_exit_2_one_line, run_cli, snapshot


@pytest.mark.parametrize("name, runs_with", [("demo_digits", "sharp-unlearn demo --spec demo_digits"),
                                             ("reproduce_digits", "sharp-unlearn reproduce table")])
@pytest.mark.parametrize("command", ["pretrain", "memorization"])
def test_packaged_grid_specs_are_refused_by_run_commands(tmp_path, name, runs_with, command):
    before = snapshot(tmp_path)
    proc = run_cli([command, "--no-tracking", "--config", name, f"output_dir={tmp_path / 'runs'}"], tmp_path)
    assert_exit_2_one_line(proc, command, repr(name), "grid spec", runs_with)
    assert "unknown key base" not in proc.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args, needles", [
    (["optimizer.rhoo=0.1"], ["optimizer.rhoo", "rho"]),
    (["--checkpoint", "x.pt"], ["--checkpoint", "not pretrain"]),
    (["--command", "unlearn", "--checkpoint", "missing.pt"], ["'missing.pt'", "not a file"]),
    (["--spec", "demo_digits"], ["--spec", "demo or reproduce"]),
    (["--command", "demo", "--config", "a.yaml"], ["--spec", "not --config"]),
    (["--command", "demo", "base.train.epocs=3"], ["train.epocs", "epochs"]),
])
def test_config_show_bad_input(tmp_path, args, needles):
    before = snapshot(tmp_path)
    proc = run_cli(["config", "show", *args], tmp_path)
    assert_exit_2_one_line(proc, "config", *needles)  # "config", not the --command it resolves
    assert snapshot(tmp_path) == before


def test_evaluate_without_a_checkpoint(tmp_path):
    proc = run_cli(["evaluate", "--no-tracking", "--metrics", "accuracy"], tmp_path)
    assert_exit_2_one_line(proc, "evaluate", "no checkpoint given", "--checkpoint PATH")
    assert snapshot(tmp_path) == {}
