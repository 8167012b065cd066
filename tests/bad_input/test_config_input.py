"""Bad config input (files, seeds, non-finite numbers): exit 2, one line naming the value, nothing written."""
from __future__ import annotations

import pytest

from bad_input.harness import SMALL, assert_exit_2_one_line, run_cli, snapshot


def _pretrain(tmp_path, *args: str):
    before = snapshot(tmp_path)
    proc = run_cli(["pretrain", "--no-tracking", f"output_dir={tmp_path / 'runs'}", "train.epochs=1", *SMALL,
                    *args], tmp_path)
    return proc, before


def test_directory_as_config(tmp_path):
    (tmp_path / "conf.yaml").mkdir()
    proc, before = _pretrain(tmp_path, "--config", str(tmp_path / "conf.yaml"))
    assert_exit_2_one_line(proc, "pretrain", "conf.yaml", "is a directory", "YAML file")
    assert snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


def test_non_utf8_config(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("train:\n  epochs: 1\n# r\xe9sum\xe9\n".encode("latin-1"))
    proc, before = _pretrain(tmp_path, "--config", str(tmp_path / "latin1.yaml"))
    assert_exit_2_one_line(proc, "pretrain", "latin1.yaml", "not UTF-8")
    assert snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


def test_seed_beyond_what_seeding_takes(tmp_path):
    proc, before = _pretrain(tmp_path, f"seed={2**70}")
    assert_exit_2_one_line(proc, "pretrain", f"seed={2**70}", f"[0, {2**32 - 1}]")
    assert snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, needle, expected", [
    ("optimizer.rho=inf", "optimizer.rho=inf", "a finite value >= 0.0"),
    ("optimizer.lr=inf", "optimizer.lr=inf", "a finite value > 0.0"),
    ("optimizer.lr=-inf", "optimizer.lr=-inf", "a finite value > 0.0"),
    ("optimizer.lamb=.inf", "optimizer.lamb=inf", "a finite value >= 0.0"),
    ("optimizer.weight_decay=inf", "optimizer.weight_decay=inf", "a finite value >= 0.0"),
    ("train.grad_clip=inf", "train.grad_clip=inf", "a finite value >= 0.0"),
    ("train.gamma=inf", "train.gamma=inf", "a finite value > 0.0"),
    ("optimizer.betas=[0.9, inf]", "optimizer.betas[1]=inf", "[0.0, 1.0)"),
    ("tracking.max_artifact_mb=inf", "tracking.max_artifact_mb=inf", "a finite value >= 0.0"),
    ("optimizer.rho=nan", "optimizer.rho=nan", "a finite value >= 0.0"),
])
def test_non_finite_floats_are_refused(tmp_path, override, needle, expected):
    proc, before = _pretrain(tmp_path, override)
    line = assert_exit_2_one_line(proc, "pretrain", needle, expected)
    assert "inf]" not in line  # the stated range must not claim inf is allowed
    assert snapshot(tmp_path) == before and not (tmp_path / "runs").exists()
