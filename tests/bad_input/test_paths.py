"""Paths and leftovers: bad output paths and checkpoints are exit 2 with nothing written; failed or
interrupted runs leave resumable state or nothing; resumed runs report their whole wall time; two runs
needing one retrained reference train it once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bad_input.harness import REPO, SMALL, assert_exit_2_one_line, run_cli, snapshot
from sharp_unlearn.engine.checkpoint import load_checkpoint

FORGET = ["forget.kind=random", "forget.size=100"]


def _popen(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "sharp_unlearn", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(predicate, proc: subprocess.Popen, what: str, limit_s: float = 900.0):
    """Poll until ``predicate()`` is truthy; fail if the process ends first (the limit only stops a hang)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}: {err[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no {what} within {limit_s} s")


def _checkpoint_at(path_glob, tmp: Path, min_epoch: int = 1):
    for path in tmp.glob(path_glob):
        try:
            state = load_checkpoint(path)
        except Exception:  # noqa: BLE001 - replaced between glob and read: look again
            continue
        if int(state.get("epoch", 0)) >= min_epoch and not state.get("completed"):
            return path, state
    return None


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrained")
    proc = run_cli(["pretrain", "--no-tracking", "--json", "--quiet", f"output_dir={root / 'runs'}",
                    "train.epochs=4", *SMALL], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(json.loads(proc.stdout)["checkpoint"])


@pytest.mark.parametrize("make, where", [
    (lambda tmp: (tmp / "taken").write_text("x") and tmp / "taken", "is a file"),
    (lambda tmp: (tmp / "taken").write_text("x") and tmp / "taken" / "runs", "lies below the file"),
])
def test_output_dir_that_is_a_file(tmp_path, make, where):
    output_dir = make(tmp_path)
    before = snapshot(tmp_path)
    proc = run_cli(["pretrain", "--no-tracking", f"output_dir={output_dir}", "train.epochs=1", *SMALL], tmp_path)
    assert_exit_2_one_line(proc, "pretrain", str(output_dir), where, "expected a directory")
    assert snapshot(tmp_path) == before


def test_reproduce_output_dir_below_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    before = snapshot(tmp_path)
    proc = run_cli(["reproduce", "--no-tracking", "--output-dir", str(tmp_path / "taken" / "out"), "table"], tmp_path)
    assert_exit_2_one_line(proc, "reproduce", str(tmp_path / "taken" / "out"), "lies below the file")
    assert snapshot(tmp_path) == before


class _Opaque:  # a pickled object that a weights-only load refuses
    pass


def test_unreadable_checkpoint_gives_no_unsafe_advice(tmp_path):
    torch.save({"model": {}, "payload": _Opaque()}, tmp_path / "foreign.pt")
    before = snapshot(tmp_path)
    proc = run_cli(["unlearn", "--no-tracking", "--checkpoint", str(tmp_path / "foreign.pt"),
                    f"output_dir={tmp_path / 'runs'}", *FORGET], tmp_path)
    line = assert_exit_2_one_line(proc, "unlearn", "foreign.pt", "expected a checkpoint written by sharp-unlearn")
    assert "weights_only" not in line and "False" not in line
    assert snapshot(tmp_path) == before


def test_failure_before_a_first_checkpoint_leaves_no_run_folder(tmp_path):
    proc = run_cli(["pretrain", "--no-tracking", f"output_dir={tmp_path / 'runs'}", "optimizer.lr=1e30",
                    "train.epochs=1", *SMALL], tmp_path)
    assert proc.returncode == 1 and "diverged" in proc.stderr, proc.stderr[-3000:]
    assert snapshot(tmp_path / "runs") == {}  # no config.yaml-only folder


@pytest.mark.slow
def test_interrupted_pretrain_resumes_with_its_whole_wall_time(tmp_path):
    args = ["pretrain", "--no-tracking", "--json", "--quiet", f"output_dir={tmp_path / 'runs'}", "train.epochs=8",
            *SMALL]
    proc = _popen(args, tmp_path)
    path, _ = _wait_for(lambda: _checkpoint_at("runs/pretrain/*/checkpoint.pt", tmp_path, 4), proc,
                        "a checkpoint at epoch 4")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=300)
    assert proc.returncode == 130
    state = load_checkpoint(path)
    assert not state["completed"] and "wall_seconds" in state  # the first part's time is kept for the resume
    first_part, done = state["wall_seconds"], state["epoch"]
    assert (path.parent / "config.yaml").is_file()
    resumed = run_cli(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = load_checkpoint(path)
    assert final["completed"] and len(final["history"]) == 8 and done < 8
    assert json.loads(resumed.stdout)["wall_seconds"] > first_part
    assert final["wall_seconds"] > first_part


@pytest.mark.slow
def test_interrupted_unlearning_leaves_a_resumable_folder(tmp_path, pretrained):
    args = ["unlearn", "--no-tracking", "--json", "--quiet", "--checkpoint", str(pretrained),
            f"output_dir={tmp_path / 'runs'}", *FORGET, "method.name=neggrad", "method.epochs=20"]
    proc = _popen(args, tmp_path)
    # the unlearning stage has started once its own checkpoint exists (the reference is done by then)
    path, _ = _wait_for(lambda: _checkpoint_at("runs/unlearn/*/stage.pt", tmp_path), proc,
                        "the unlearning stage's first checkpoint")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err
    # resumable: the stage checkpoint (not completed) and nothing that looks like a result
    assert sorted(p.name for p in path.parent.iterdir()) == ["stage.pt"]
    state = load_checkpoint(path)
    assert not state["completed"] and 1 <= state["epoch"] < 20
    first_part = state["wall_seconds"]
    resumed = run_cli(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout)
    assert Path(result["checkpoint"]).parent == path.parent
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt", "config.yaml", "forget_set.parquet",
                                                             "results.parquet"]
    assert result["metrics"]["wall_seconds"] > first_part


@pytest.mark.slow
def test_two_runs_on_one_split_train_the_reference_once(tmp_path, pretrained):
    args = ["retrain", "--no-tracking", "--json", "--quiet", "--checkpoint", str(pretrained),
            f"output_dir={tmp_path / 'runs'}", *FORGET]
    procs = [_popen(args, tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads(out) for out, _ in outs]
    assert results[0]["checkpoint"] == results[1]["checkpoint"]
    assert sorted(r["cached"] for r in results) == [False, True]  # one trained it, the other waited and reused it
    assert [p.name for p in (tmp_path / "runs" / "retrain").iterdir() if not p.name.startswith(".")] == [
        Path(results[0]["checkpoint"]).parent.name]
