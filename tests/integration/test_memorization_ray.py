"""Held-out memorization with real Ray: same numbers as in-process, clean shutdown, kill and resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sharp_unlearn.config import load_config
from sharp_unlearn.recipes.memorization_heldout import HeldoutSettings, run_heldout

pytestmark = [pytest.mark.integration, pytest.mark.distributed, pytest.mark.slow]

RECIPE = ["data.label_noise=0.05", "model.name=mlp", "model.options={hidden: [32]}", "train.epochs=5"]


@pytest.fixture(autouse=True)
def _own_local_ray(monkeypatch):
    """Each test starts (and stops) its own local Ray; never attach to one found on the machine."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield
    import ray

    assert not ray.is_initialized(), "the run left its Ray session open"


def test_ray_run_interrupted_shuts_down_resumes_and_matches_in_process(tmp_path):
    """Two Ray sessions (each ~10 s to start): an error after 2 finished models shuts Ray down
    and keeps those 2; the resumed run trains only the rest; every model equals its in-process twin."""
    import ray

    cfg = load_config([], [f"output_dir={tmp_path}", "tracking.enabled=false", *RECIPE])

    class Boom(RuntimeError):
        pass

    seen: list[int] = []

    def fail_after_two(outcome):
        seen.append(outcome.model_id)
        if len(seen) == 2:
            raise Boom()

    run_dir = tmp_path / "ray"
    with pytest.raises(Boom):
        run_heldout(cfg, HeldoutSettings(num_models=5, workers=2), run_dir=run_dir, quiet=True,
                    on_model_done=fail_after_two)
    assert not ray.is_initialized()
    on_disk = sorted(int(p.stem.split("-")[1]) for p in (run_dir / "models").glob("model-*.npz"))
    assert on_disk == sorted(seen)

    resumed = run_heldout(cfg, HeldoutSettings(num_models=5, workers=2), run_dir=run_dir, quiet=True)
    assert not ray.is_initialized()
    assert sorted(resumed.trained) == sorted(set(range(5)) - set(seen))
    assert resumed.reused == sorted(seen)

    serial = run_heldout(cfg, HeldoutSettings(num_models=5, executor="serial"), run_dir=tmp_path / "serial",
                         quiet=True)
    np.testing.assert_array_equal(resumed.masks, serial.masks)
    np.testing.assert_array_equal(resumed.train_correct, serial.train_correct)
    np.testing.assert_array_equal(resumed.test_correct, serial.test_correct)


def _count_models(run_dir: Path) -> int:
    return len(list((run_dir / "models").glob("model-*.npz"))) if (run_dir / "models").exists() else 0


def test_cli_killed_half_way_resumes_training_only_the_missing_models(tmp_path):
    """SIGTERM to a running `sharp-unlearn memorization` after 3 of 10 model files exist,
    then the same command again: it trains exactly the models that were not on disk."""
    run_dir = tmp_path / "mem"
    num_models = 10
    command = [sys.executable, "-m", "sharp_unlearn", "memorization", "--json", "--quiet",
               "--models", str(num_models), "--workers", "2", "--out", str(run_dir),
               "--no-tracking", f"output_dir={tmp_path}", *RECIPE, "train.epochs=25"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        deadline = time.monotonic() + 480  # a hang guard: 3 models take ~1 min idle, several at load 6
        while _count_models(run_dir) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()[1][-2000:]}"
        assert _count_models(run_dir) >= 3, "no progress within the deadline"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)  # a hang guard: the shutdown is slow under load
    finally:
        if proc.poll() is None:  # only the process this test started
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]  # SIGTERM unwinds like Ctrl-C (Ray shut down in a finally)
    assert "interrupted" in err
    kept = _count_models(run_dir)
    assert 3 <= kept < num_models
    assert not list((run_dir / "models").glob(".*tmp"))  # no half-written file

    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["models_reused"] == kept
    assert result["models_trained"] == num_models - kept
    assert _count_models(run_dir) == num_models
