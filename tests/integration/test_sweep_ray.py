"""Real Ray Tune sweeps on digits (a local Ray instance with 2 CPUs, not local mode).

- an ASHA sweep of 6 trials: some stopped early, table and best config printed,
  MLflow parent + child runs, ``compare`` over the sweep's runs;
- a trial's worker process killed mid-trial: retried from its last checkpoint;
- the whole sweep interrupted (SIGINT): ``--resume`` finishes it without
  re-running finished trials (trainings counted from the trials' own ledger).

Small on purpose: tiny CNN (width 8), few epochs, 1 CPU per trial.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.distributed]

ray = pytest.importorskip("ray")


def write_sweep(tmp_path: Path, name: str, **changes) -> Path:
    raw = {
        "name": name, "stage": "unlearn", "output_dir": str(tmp_path / "runs"),
        "base": {"seed": 0, "data": {"name": "digits", "label_noise": 0.05, "batch_size": 64, "augment": False},
                 "model": {"name": "small_cnn", "options": {"width": 8, "feature_dim": 32}},
                 "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
                 "train": {"epochs": 10, "schedule": "cosine"}},
        "forget": {"kind": "memorization", "level": "high", "size": 30, "scores": "flipped"},
        "unlearn": {"optimizer": {"lr": 0.02, "weight_decay": 0.0}, "train": {"schedule": "constant"}},
        "method": {"name": "neggrad", "epochs": 5, "alpha": 0.9},
        "search": {"method.alpha": {"grid": [0.9, 0.95]}},
        "scheduler": "fifo", "num_samples": 1, "max_concurrent": 2, "resources": {"cpu": 1}, "max_failures": 2,
    }
    raw.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def ledger(storage: Path, name: str) -> dict[str, list[dict]]:
    """Every trial's events, in order (the trials write them; see tuning/trainables.py)."""
    out = {}
    for file in sorted((storage / name / "_sharp_unlearn" / "trainings").glob("*.jsonl")):
        out[file.stem] = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return out


def mlflow_ready() -> bool:
    return Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).is_file()


def mlflow_runs(kind: str | None = None):
    from sharp_unlearn.tracking import client_for

    # through the store lock, like every process of the tool: polling a store the sweep is still
    # creating with a bare MlflowClient would race its schema migration
    client = client_for(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("sharp-unlearn")
    if experiment is None:
        return client, []
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return client, [r for r in runs if kind is None or r.data.tags.get("kind") == kind]


@pytest.fixture(autouse=True)
def _no_ray_left_behind():
    yield
    if ray.is_initialized():  # a failed test must not leave its Ray instance to the next one
        ray.shutdown()


def test_asha_sweep_on_digits_with_mlflow_tree_and_compare(tmp_path, capsys):
    from sharp_unlearn.cli import main

    # alpha 0.5 wrecks the model within an epoch: ASHA has something to stop
    path = write_sweep(tmp_path, "asha", method={"name": "sharp_minmax", "epochs": 4, "alpha": 0.9,
                                                 "mask_fraction": 0.5},
                       search={"method.alpha": {"grid": [0.5, 0.9, 0.99]},
                               "method.rho_max": {"loguniform": [0.01, 0.1]}},
                       scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2}, num_samples=2)
    storage = tmp_path / "storage"
    code = main(["sweep", str(path), "--num-cpus", "2", "--storage", str(storage)])
    out = capsys.readouterr().out
    assert code == 0
    assert "sweep asha: max tow" in out and "best trial" in out and "method.alpha = " in out
    assert "original" in out and "retrain" in out  # the do-nothing row and the reference next to the trials

    client, trials = mlflow_runs("trial")
    _, parents = mlflow_runs("sweep")
    assert len(parents) == 1 and len(trials) == 6
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    assert all("method.alpha" in t.data.params and "method.rho_max" in t.data.params for t in trials)
    assert all(t.info.status == "FINISHED" for t in trials)

    # ASHA stopped some trials early: fewer reported epochs than configured, in MLflow and in the ledger
    epochs_run = {t.data.tags["trial_id"]: max(m.step for m in client.get_metric_history(t.info.run_id, "tow"))
                  for t in trials}
    stopped = [t for t in trials if t.data.tags["stopped_early"] == "true"]
    assert stopped and all(epochs_run[t.data.tags["trial_id"]] < 4 for t in stopped)
    assert any(steps == 4 for steps in epochs_run.values())
    events = ledger(storage, "asha")
    assert len(events) == 6 and all(e[0]["event"] == "start" and e[0]["start_epoch"] == 0 for e in events.values())

    # the best trial: tagged on its child run, its config and metric on the parent
    best = [t for t in trials if t.data.tags.get("best_trial") == "true"]
    assert len(best) == 1
    assert parent.data.tags["best_trial_id"] == best[0].data.tags["trial_id"]
    assert parent.data.tags["best_run_id"] == best[0].info.run_id
    assert float(parent.data.tags["best.method.alpha"]) == float(best[0].data.params["method.alpha"])
    assert parent.data.metrics["best_tow"] == pytest.approx(best[0].data.metrics["tow"])
    assert best[0].data.tags["stopped_early"] == "false"
    best_cfg = yaml.safe_load((storage / "asha" / "best_config.yaml").read_text())
    assert best_cfg["config"]["method"]["alpha"] == float(best[0].data.params["method.alpha"])
    # the shared pretrained model and reference were trained once, before the trials
    _, pretrains = mlflow_runs("pretrain")
    _, references = mlflow_runs("retrain")
    assert len(pretrains) == 1 and len(references) == 1
    assert parent.data.tags["reference_run_id"] == references[0].info.run_id

    # `compare` over the sweep's runs (filter by parent)
    code = main(["compare", "--filter", f"tags.mlflow.parentRunId = '{parent.info.run_id}'", "--no-log", "--json",
                 "--out", str(tmp_path / "compare")])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and len(result["runs"]) == 6


def test_sweep_json_prints_one_document_on_stdout(tmp_path):
    """`--json`: stdout is exactly one JSON document; Ray Tune's experiment and progress tables
    (printed on stdout by Tune itself) go to stderr while the sweep runs."""
    path = write_sweep(tmp_path, "json", method={"name": "neggrad", "epochs": 1, "alpha": 0.9},
                       search={"method.alpha": {"grid": [0.9]}}, max_concurrent=1)
    # the CLI in its own process, as a user runs it: Tune prints from the driver process
    driver = subprocess.run([sys.executable, "-m", "sharp_unlearn", "sweep", str(path), "--num-cpus", "1",
                             "--storage", str(tmp_path / "storage"), "--json"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert driver.returncode == 0, driver.stderr[-3000:]
    result = json.loads(driver.stdout)
    assert result["name"] == "json" and [r["status"] for r in result["rows"]] == ["TERMINATED"]
    assert result["best"]["trial_id"] == result["rows"][0]["trial_id"]


def test_killed_trial_worker_is_retried_from_its_checkpoint(tmp_path):
    from sharp_unlearn.tuning import load_sweep, run_sweep

    path = write_sweep(tmp_path, "fault", method={"name": "neggrad", "epochs": 8, "alpha": 0.9})
    spec = load_sweep(path, storage=str(tmp_path / "storage"))
    storage = Path(spec.storage)
    killed: dict[str, int] = {}
    stop = threading.Event()

    def kill_one_worker_mid_trial():
        # once a trial has reported (and checkpointed) its 2nd epoch, SIGKILL its worker process
        while not stop.is_set() and not killed:
            for trial_id, events in ledger(storage, "fault").items():
                epochs = [e for e in events if e["event"] == "epoch" and e["epoch"] >= 2]
                if epochs:
                    os.kill(epochs[0]["pid"], signal.SIGKILL)
                    killed.update(trial_id=trial_id, pid=epochs[0]["pid"])
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_one_worker_mid_trial, daemon=True)
    watcher.start()
    try:
        outcome = run_sweep(spec, num_cpus=2, quiet=True)
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert killed, "no worker was killed: the trials finished too fast for the watcher"
    assert [r["status"] for r in outcome.rows] == ["TERMINATED", "TERMINATED"]  # the sweep completed

    events = ledger(storage, "fault")[killed["trial_id"]]
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 2  # the first attempt, and one retry
    before = [e["epoch"] for e in events if e["event"] == "epoch" and e["pid"] == killed["pid"]]
    resumed_from = starts[1]["start_epoch"]
    # the retry continued from the last checkpoint of the killed attempt (the one being reported when
    # the signal landed at the latest), never from scratch
    assert resumed_from >= 2 and resumed_from in (before[-1], before[-1] + 1)
    after = [e["epoch"] for e in events if e["event"] in ("epoch", "done") and e["pid"] != killed["pid"]]
    assert after == list(range(resumed_from + 1, 9))  # epochs before the checkpoint were not trained again

    client, trials = mlflow_runs("trial")
    assert len(trials) == 2  # the retry continued its own child run
    retried = [t for t in trials if t.data.tags["trial_id"] == killed["trial_id"]][0]
    assert retried.data.tags.get("retries") == "1" and retried.info.status == "FINISHED"


def test_interrupted_sweep_resumes_without_repeating_finished_trials(tmp_path):
    path = write_sweep(tmp_path, "resume", search={"method.alpha": {"grid": [0.8, 0.85, 0.9, 0.93, 0.96, 0.99]}},
                       method={"name": "neggrad", "epochs": 6, "alpha": 0.9})
    storage = tmp_path / "storage"
    command = [sys.executable, "-m", "sharp_unlearn", "sweep", str(path), "--num-cpus", "2", "--storage",
               str(storage), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # a hang guard, not a bound: 2 trials take ~1 min idle, several at load 6 on 2 cores
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and first.poll() is None:
            # complete in Ray Tune's eyes = the driver ended the trial's child run FINISHED
            try:
                if mlflow_ready() and sum(t.info.status == "FINISHED" for t in mlflow_runs("trial")[1]) >= 2:
                    break
            except Exception:  # noqa: BLE001 - the store is still being created by the sweep
                pass
            time.sleep(0.2)
        assert first.poll() is None, f"the sweep ended before it could be interrupted:\n{first.stdout.read()}"
        first.send_signal(signal.SIGINT)  # Ctrl-C: Ray Tune saves the experiment state and stops
        output, _ = first.communicate(timeout=300)  # Ray Tune saves its state first: slow under load
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, output
    assert "--resume" in output
    snapshot = ledger(storage, "resume")
    _, trials = mlflow_runs("trial")
    finished_first = {t.data.tags["trial_id"] for t in trials if t.info.status == "FINISHED"}
    assert 2 <= len(finished_first) < 6
    assert all(t.info.status == "KILLED" for t in trials if t.data.tags["trial_id"] not in finished_first)
    _, parents = mlflow_runs("sweep")
    assert [p.info.status for p in parents] == ["KILLED"]

    second = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    final = ledger(storage, "resume")
    assert len(final) == 6
    for trial_id, events in final.items():
        starts = [e for e in events if e["event"] == "start"]
        trained = [e["epoch"] for e in events if e["event"] in ("epoch", "done")]
        if trial_id in finished_first:  # trained once, in the first run: nothing repeated
            assert len(starts) == 1 and events == snapshot[trial_id], f"finished trial {trial_id} ran again"
        elif trial_id in snapshot:  # in flight at the interrupt: continued from its last reported epoch
            last = max([e["epoch"] for e in snapshot[trial_id] if e["event"] == "epoch"], default=0)
            assert len(starts) == 2 and starts[1]["start_epoch"] >= last
            assert sorted(set(trained)) == list(range(1, 7))
        else:  # not started before the interrupt
            assert len(starts) == 1 and trained == list(range(1, 7))
    _, parents = mlflow_runs("sweep")
    _, trials = mlflow_runs("trial")
    assert [p.info.status for p in parents] == ["FINISHED"]  # the same parent run, reopened and finished
    assert len(trials) == 6 and all(t.info.status == "FINISHED" for t in trials)


def test_stage_both_pretrains_per_trial_and_logs_both_configs(tmp_path):
    from sharp_unlearn.tuning import load_sweep, run_sweep

    path = write_sweep(tmp_path, "both", stage="both", method={"name": "neggrad", "epochs": 2, "alpha": 0.95},
                       search={"pretrain.optimizer": {"grid": [{"name": "sgd"}, {"name": "sam", "rho": 0.05}]}})
    outcome = run_sweep(load_sweep(path, storage=str(tmp_path / "storage")), num_cpus=2, quiet=True)
    assert [r["status"] for r in outcome.rows] == ["TERMINATED", "TERMINATED"]
    assert all(0.0 <= r["tow"] <= 1.0 and r["epochs"] == 2 for r in outcome.rows)
    # one pretrained model and one reference per pretraining optimizer, in the shared cache
    for kind in ("pretrain", "retrain"):
        names = sorted(p.name.split("-")[2] for p in (tmp_path / "runs" / kind).iterdir()
                       if p.is_dir())  # run folders; their cache locks are files beside them
        assert names == ["sam", "sgd"], (kind, names)
    _, trials = mlflow_runs("trial")
    assert sorted(t.data.params["pretrain.optimizer.name"] for t in trials) == ["sam", "sgd"]
    assert sorted(t.data.tags["pretrain_optimizer"] for t in trials) == ["sam", "sgd"]
    # the unlearning side starts from each trial's own pretraining config (here: its optimizer too)
    assert sorted(t.data.params["optimizer.name"] for t in trials) == ["sam", "sgd"]


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def test_sweep_joins_an_existing_ray_head_with_address(tmp_path, free_port):
    """`--address`: the driver joins a Ray head started separately (as cluster/start-local.sh does)."""
    import shutil
    import tempfile

    # a short temp dir: Ray's unix socket paths must stay under ~107 characters
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    head = subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
                             str(free_port), "--num-cpus", "2", "--include-dashboard", "false", "--temp-dir",
                             str(ray_tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_worker_niceness": "0"})  # as start-local.sh sets it
    try:
        deadline = time.monotonic() + 300  # a hang guard: the head starts in ~5 s idle, far slower under load
        while time.monotonic() < deadline and head.poll() is None:
            if "blocking" in _head_log(ray_tmp) or list(ray_tmp.glob("session_*/logs/raylet.out")):
                break
            time.sleep(0.5)
        assert head.poll() is None, "the Ray head did not start"
        # the event the driver needs, not a fixed pause: the head's GCS accepts connections
        while not _accepts(free_port) and head.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _accepts(free_port), "the Ray head's port never accepted a connection"
        path = write_sweep(tmp_path, "joined")
        # the CLI in its own process, as a user runs it (this test process has Ray imported already)
        driver = subprocess.run([sys.executable, "-m", "sharp_unlearn", "sweep", str(path), "--address",
                                 f"127.0.0.1:{free_port}", "--storage", str(tmp_path / "storage"), "--json"],
                                capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert driver.returncode == 0, driver.stderr[-3000:]
        result = json.loads(driver.stdout)  # --json: the document alone on stdout
        assert [r["status"] for r in result["rows"]] == ["TERMINATED", "TERMINATED"]
        assert head.poll() is None  # the driver left the cluster it joined running
    finally:
        head.terminate()  # `ray start --block` stops its own processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    _, trials = mlflow_runs("trial")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)


def _head_log(ray_tmp: Path) -> str:
    return "".join(f.read_text(errors="replace") for f in ray_tmp.glob("session_*/logs/raylet.out"))
