"""Ray-backed commands join a head started by the project's own ``cluster/start-local.sh``
(loopback only, token auth on because a token is on disk, as after any earlier ``ray start``),
through ``--address 127.0.0.1:PORT`` and through ``$RAY_ADDRESS``.

That the command ran *on the head* (not on a Ray of its own) is read from the head's logs: Ray
writes one ``python-core-driver-<job>_<pid>.log`` there for every driver that joins it.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.distributed, pytest.mark.slow]

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
#: hang guards only (nothing asserts on time): a head starts in ~15 s idle, a minute or more at load 10+
HEAD_START_GUARD_S = 300
COMMAND_GUARD_S = 900


class Head:
    def __init__(self, port: int, home: Path, temp_dir: Path):
        self.address = f"127.0.0.1:{port}"
        self.home, self.temp_dir = home, temp_dir

    def drivers(self) -> set[int]:
        """Pids of every driver that has joined this head."""
        logs = self.temp_dir / "session_latest" / "logs"
        return {int(p.stem.rsplit("_", 1)[1]) for p in logs.glob("python-core-driver-*_*.log")}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path_factory.mktemp("home")
    # a token on disk: `ray start` then switches token auth on, and a driver must send it
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    temp_dir = Path(f"/tmp/ray-su-test-{port}")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "HOME": str(home), "RAY_TMP_DIR": str(temp_dir)}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(key, None)
    proc = subprocess.Popen(["bash", str(ROOT / "cluster" / "start-local.sh"), "2", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started, lines = threading.Event(), []

    def read_output():
        for line in proc.stdout:
            lines.append(line)
            if "Ray runtime started" in line:
                started.set()
        started.set()  # the head ended: stop waiting

    threading.Thread(target=read_output, daemon=True).start()
    try:
        started.wait(HEAD_START_GUARD_S)
        assert proc.poll() is None and any("Ray runtime started" in x for x in lines), "".join(lines[-40:])
        yield Head(port, home, temp_dir)
    finally:
        # `ray start --block` stops exactly its own processes on SIGTERM; the group kill is the fallback
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _env(head: Head, via_env: bool) -> dict[str, str]:
    env = {**os.environ, "HOME": str(head.home), "OMP_NUM_THREADS": "1"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(key, None)
    if via_env:
        env["RAY_ADDRESS"] = head.address
    return env


def _run(head: Head, args: list[str], via_env: bool) -> tuple[subprocess.CompletedProcess, int]:
    command = [sys.executable, "-m", "sharp_unlearn", *args, *([] if via_env else ["--address", head.address])]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(head, via_env), cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=COMMAND_GUARD_S)
    finally:
        if proc.poll() is None:  # only the process this test started
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(command, proc.returncode, out, err), proc.pid


@pytest.mark.parametrize("via_env", [False, True], ids=["--address", "RAY_ADDRESS"])
def test_memorization_joins_a_local_head(head, tmp_path, via_env):
    args = ["memorization", "--json", "--quiet", "--models", "2", "--workers", "2", "--out", str(tmp_path / "mem"),
            "--no-tracking", f"output_dir={tmp_path}", "data.label_noise=0.05", "model.name=mlp",
            "model.options={hidden: [16]}", "train.epochs=1"]
    done, pid = _run(head, args, via_env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["models_trained"] == 2
    assert pid in head.drivers()  # it joined the head, it did not start a Ray of its own


def _write_sweep(tmp_path: Path) -> Path:
    raw = {
        "name": "address", "stage": "unlearn", "output_dir": str(tmp_path / "runs"),
        "base": {"seed": 0, "data": {"name": "digits", "label_noise": 0.05, "batch_size": 64, "augment": False},
                 "model": {"name": "small_cnn", "options": {"width": 4, "feature_dim": 16}},
                 "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
                 "train": {"epochs": 1, "schedule": "constant"}},
        "forget": {"kind": "memorization", "level": "high", "size": 20, "scores": "flipped"},
        "unlearn": {"optimizer": {"lr": 0.02, "weight_decay": 0.0}, "train": {"schedule": "constant"}},
        "method": {"name": "neggrad", "epochs": 1, "alpha": 0.9},
        "search": {"method.alpha": {"grid": [0.9]}},
        "scheduler": "fifo", "num_samples": 1, "max_concurrent": 1, "resources": {"cpu": 1},
    }
    path = tmp_path / "address.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("via_env", [False, True], ids=["--address", "RAY_ADDRESS"])
def test_sweep_joins_a_local_head(head, tmp_path, via_env):
    args = ["sweep", str(_write_sweep(tmp_path)), "--json", "--no-tracking", "--storage", str(tmp_path / "storage")]
    done, pid = _run(head, args, via_env)
    assert done.returncode == 0, done.stderr[-3000:]
    # the JSON document is the end of stdout (Ray Tune prints its experiment table on stdout before it)
    start = 0 if done.stdout.startswith("{") else done.stdout.rindex("\n{\n") + 1
    result = json.loads(done.stdout[start:])
    assert len(result["rows"]) == 1 and result["rows"][0]["status"] == "TERMINATED", result
    assert pid in head.drivers()


@pytest.mark.parametrize("via_env", [False, True], ids=["--address", "RAY_ADDRESS"])
def test_sharded_pretrain_and_unlearn_join_a_local_head(head, tmp_path, via_env):
    # DeepSpeed runs of 2 workers (1 CPU each: the head's 2 CPUs) launched through Ray Train on the head:
    # the pretraining, then an unlearning run (its retrained reference follows the pretraining's recipe,
    # so it runs sharded on the head too)
    common = ["--json", "--quiet", "--no-tracking", f"output_dir={tmp_path}"]
    sharded = ["distributed.backend=deepspeed", "distributed.launcher=ray", "distributed.num_workers=2",
               "distributed.zero_stage=1"]
    args = ["pretrain", *common, "data.name=digits", "data.augment=false", "model.name=mlp",
            "model.options={hidden: [16]}", "train.epochs=1", *sharded]
    done, pid = _run(head, args, via_env)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = json.loads(done.stdout)["checkpoint"]
    assert Path(checkpoint).is_file()
    assert pid in head.drivers()
    if via_env:  # unlearn finds the head exactly as pretrain does (one launch path): once is enough
        return

    args = ["unlearn", "--checkpoint", checkpoint, *common, "forget.kind=random", "forget.size=20",
            "method.name=neggrad", "method.epochs=1", *sharded]
    done, pid = _run(head, args, via_env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert Path(result["checkpoint"]).is_file() and 0.0 <= result["metrics"]["tow"] <= 1.0, result
    assert pid in head.drivers()
