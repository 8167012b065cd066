"""Killing one worker fails the whole run within the stated timeout; a restart resumes.

Real processes: ``sharp-unlearn pretrain ... distributed.launcher=torchrun`` with
2 gloo workers (ZeRO-2, SAM). When rank 1 is killed (SIGKILL), torchrun stops
rank 0 and the command exits 1 naming the last committed sharded checkpoint,
well within ``distributed.timeout_s`` (the bound for survivors on other nodes,
which only notice at their next collective). Rerunning the same command
continues from that checkpoint and finishes the remaining epochs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TIMEOUT_S = 30
EPOCHS = 40


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.distributed
@pytest.mark.slow
def test_killed_worker_fails_the_run_and_a_restart_resumes(tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "sharp_unlearn", "pretrain", "--json", "--quiet", f"output_dir={out}",
           "data.batch_size=32", "model.name=mlp", "model.options={hidden: [48]}", f"train.epochs={EPOCHS}",
           "optimizer.name=sam", "tracking.enabled=false", "distributed.backend=deepspeed",
           "distributed.zero_stage=2", "distributed.num_workers=2", "distributed.launcher=torchrun",
           f"distributed.timeout_s={TIMEOUT_S}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        progress = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(out.glob("pretrain/*/deepspeed/progress.json"))
            if found:
                try:
                    progress = json.loads(found[0].read_text())
                except (OSError, json.JSONDecodeError):
                    progress = None
                if progress and progress["epoch"] >= 2:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert progress is not None and progress["epoch"] >= 2 and not progress["completed"]
        run_dir = found[0].parent.parent
        rank0 = int((run_dir / "launch" / "rank0.pid").read_text())
        rank1 = int((run_dir / "launch" / "rank1.pid").read_text())

        os.kill(rank1, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=TIMEOUT_S + 60)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:  # only our own process group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    print(f"run failed {elapsed:.1f}s after rank 1 was killed (bound: {TIMEOUT_S}s)")
    assert proc.returncode == 1, err[-3000:]
    assert elapsed < TIMEOUT_S, f"the run took {elapsed:.1f}s to fail"
    assert "sharded run failed" in err and "rerun the same command to resume" in err
    assert "torchrun exited with code" in err
    assert not _alive(rank0), "rank 0 outlived the failed run"
    committed = json.loads((run_dir / "deepspeed" / "progress.json").read_text())
    assert not (run_dir / "checkpoint.pt").exists()  # no export from a failed run

    restart = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert restart.returncode == 0, restart.stderr[-3000:]
    result = json.loads(restart.stdout)
    from sharp_unlearn.engine.checkpoint import load_checkpoint

    state = load_checkpoint(result["checkpoint"])
    assert state["completed"] and state["epoch"] == EPOCHS
    assert state["resumed_from"] == committed["epoch"] >= 2  # continued, did not start over
    assert [r["epoch"] for r in state["history"]] == list(range(1, EPOCHS + 1))
    assert result["test_acc"] > 50.0  # 40 epochs of digits: well above chance (10 %)
