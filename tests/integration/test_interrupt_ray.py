"""SIGTERM to Ray-backed commands at several moments: always exit 130 with a last "interrupted"
line, MLflow runs KILLED (never RUNNING or FINISHED), and a re-run resumes without repeating
finished work, whatever Ray prints while its workers die.

Moments: right after the command started (its first file is written), while ``ray.init`` is
starting the local Ray (its session directory appeared), half-way through the work. Each wait is
on an event (a file appearing), never a sleep.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.distributed, pytest.mark.slow]

pytest.importorskip("ray")
pytest.importorskip("mlflow")

MOMENTS = ("start", "ray_init", "half_way")


@pytest.fixture
def ray_tmp():
    """Ray's session files in a short private directory (socket paths are limited to ~100 chars),
    so the test sees when this command's ``ray.init`` started."""
    path = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(tmp_path: Path, ray_tmp: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": str(ray_tmp),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    env.pop("RAY_ADDRESS", None)
    return env


def _ray_started(ray_tmp: Path) -> bool:
    return any(ray_tmp.rglob("session_*"))


def _terminate_when(command: list[str], env: dict[str, str], cwd: Path, ready: Callable[[], bool],
                    limit_s: float = 600) -> tuple[int, str]:
    """Start ``command``, send SIGTERM as soon as ``ready()``; return (exit code, stderr)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd,
                            text=True)
    try:
        deadline = time.monotonic() + limit_s
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the command ended before the moment came:\n{proc.communicate()[1][-3000:]}"
        assert ready(), "the moment never came within the deadline"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # only the process this test started
            proc.kill()
            proc.wait()
    return proc.returncode, err


def _assert_interrupted(code: int, err: str, command: str) -> None:
    assert code == 130, err[-3000:]
    lines = err.strip().splitlines()
    assert lines and lines[-1] == f"sharp-unlearn {command}: interrupted", err[-3000:]


def _runs(tmp_path: Path, kind: str):
    if not (tmp_path / "mlruns.db").is_file():
        return []
    from sharp_unlearn.tracking import client_for

    client = client_for(f"sqlite:///{tmp_path / 'mlruns.db'}")  # through the store lock, as the tool does
    experiment = client.get_experiment_by_name("sharp-unlearn")
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id], max_results=1000)
            if r.data.tags.get("kind") == kind]


# ---------------------------------------------------------------------------------- memorization
def _models(run_dir: Path) -> int:
    return len(list((run_dir / "models").glob("model-*.npz"))) if (run_dir / "models").is_dir() else 0


@pytest.mark.parametrize("moment", MOMENTS)
def test_memorization_sigterm_exits_130_runs_killed_and_resumes(tmp_path, ray_tmp, moment):
    run_dir = tmp_path / "mem"
    num_models = 6
    command = [sys.executable, "-m", "sharp_unlearn", "memorization", "--json", "--quiet",
               "--models", str(num_models), "--workers", "2", "--out", str(run_dir), f"output_dir={tmp_path}",
               "data.label_noise=0.05", "model.name=mlp", "model.options={hidden: [32]}", "train.epochs=20"]
    env = _env(tmp_path, ray_tmp)
    ready = {"start": lambda: (tmp_path / "mlruns.db").is_file(),
             "ray_init": lambda: _ray_started(ray_tmp),
             "half_way": lambda: _models(run_dir) >= 2}[moment]
    code, err = _terminate_when(command, env, tmp_path, ready)
    _assert_interrupted(code, err, "memorization")
    runs = _runs(tmp_path, "memorization")
    assert all(r.info.status == "KILLED" for r in runs), [r.info.status for r in runs]
    if moment == "half_way":
        assert len(runs) == 1
    kept = _models(run_dir)
    assert kept < num_models
    if moment == "half_way":
        assert kept >= 2
    assert not list(run_dir.rglob(".*tmp"))  # no half-written model file

    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["models_reused"] == kept  # finished models are not trained again
    assert result["models_trained"] == num_models - kept
    statuses = sorted(r.info.status for r in _runs(tmp_path, "memorization"))
    assert statuses.count("FINISHED") == 1 and "RUNNING" not in statuses


# ---------------------------------------------------------------------------------- sweep
def _write_sweep(tmp_path: Path) -> Path:
    raw = {
        "name": "term", "stage": "unlearn", "output_dir": str(tmp_path / "runs"),
        "base": {"seed": 0, "data": {"name": "digits", "label_noise": 0.05, "batch_size": 64, "augment": False},
                 "model": {"name": "small_cnn", "options": {"width": 8, "feature_dim": 32}},
                 "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
                 "train": {"epochs": 6, "schedule": "cosine"}},
        "forget": {"kind": "memorization", "level": "high", "size": 30, "scores": "flipped"},
        "unlearn": {"optimizer": {"lr": 0.02, "weight_decay": 0.0}, "train": {"schedule": "constant"}},
        "method": {"name": "neggrad", "epochs": 6, "alpha": 0.9},
        "search": {"method.alpha": {"grid": [0.8, 0.9, 0.95, 0.99]}},
        "scheduler": "fifo", "num_samples": 1, "max_concurrent": 2, "resources": {"cpu": 1}, "max_failures": 0,
    }
    path = tmp_path / "term.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _ledger(storage: Path) -> dict[str, list[dict]]:
    out = {}
    for file in sorted((storage / "term" / "_sharp_unlearn" / "trainings").glob("*.jsonl")):
        out[file.stem] = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return out


def _trials_done(storage: Path) -> int:
    try:
        return sum(any(e["event"] == "done" for e in events) for events in _ledger(storage).values())
    except (OSError, ValueError):  # a line being written
        return 0


@pytest.mark.parametrize("moment", MOMENTS)
def test_sweep_sigterm_exits_130_runs_killed_and_resumes(tmp_path, ray_tmp, moment):
    storage = tmp_path / "storage"
    command = [sys.executable, "-m", "sharp_unlearn", "sweep", str(_write_sweep(tmp_path)), "--num-cpus", "2",
               "--storage", str(storage), "--quiet"]
    env = _env(tmp_path, ray_tmp)
    ready = {"start": lambda: (tmp_path / "mlruns.db").is_file(),
             "ray_init": lambda: _ray_started(ray_tmp),
             "half_way": lambda: _trials_done(storage) >= 1}[moment]
    code, err = _terminate_when(command, env, tmp_path, ready)
    _assert_interrupted(code, err, "sweep")
    for kind in ("sweep", "trial"):
        statuses = [r.info.status for r in _runs(tmp_path, kind)]
        assert "RUNNING" not in statuses and (kind == "trial" or "FINISHED" not in statuses), (kind, statuses)
    before = _ledger(storage)
    finished = {t for t, events in before.items() if any(e["event"] == "done" for e in events)}
    if moment == "half_way":
        assert 1 <= len(finished) < 4

    # Ray Tune saved its experiment only once it started: resume it then, else run the sweep again
    resumable = (storage / "term").is_dir() and any((storage / "term").glob("experiment_state*"))
    again = subprocess.run(command + (["--resume"] if resumable else []), capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=1200)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    after = _ledger(storage)
    assert len(after) == 4
    for trial_id in finished:  # trained once, in the first run: nothing repeated
        again_events = after[trial_id][len(before[trial_id]):]
        # Tune may restart a trial whose final report it held but had not yet marked finished when the
        # sweep stopped: it then resumes from the completed stage and reports it again, training nothing
        assert not any(e["event"] == "epoch" for e in again_events), f"finished trial {trial_id} trained again"
        assert all(e["start_epoch"] >= 6 for e in again_events if e["event"] == "start"), again_events
    sweeps = sorted(_runs(tmp_path, "sweep"), key=lambda r: r.info.start_time)
    assert [r.info.status for r in sweeps][-1] == "FINISHED"  # the resumed sweep; the first one ended KILLED
