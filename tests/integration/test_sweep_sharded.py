"""Sweeps whose trials are DeepSpeed ZeRO jobs (Ray Train inside Ray Tune), on a local 2-CPU Ray (gloo).

- ``sharp-unlearn sweep`` on a small copy of ``tuning/smoke_sharded.yaml``: 2 sharded trials,
  ASHA stops at least one on its per-epoch ToW, MLflow parent + child runs, table,
  ``best_config.yaml`` and the best trial's consolidated checkpoint, which ``evaluate`` loads;
- a sharded trial's per-epoch metrics and final weights equal the same config run in one
  process (fp32, MLP without BatchNorm, clipping off; global batch = per-rank batch x 2);
- one worker of a running sharded trial SIGKILLed: the trial is retried from its sharded
  checkpoint and the sweep ends with every trial reported once.

Waits are on files the workers write (``launch/rank<r>.pid``, ``deepspeed/progress.json``).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from sharp_unlearn.ray_cluster import ray_session

# each sharded trial starts worker processes and a DeepSpeed engine: minutes on a loaded 2-core
# machine (measured 5-10 min per trial at load 30-40), beyond the suite's default 900 s limit
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(3600)]

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

TOLERANCE = 1e-5
PER_RANK = 32
WORLD = 2
SHARDED = {"backend": "deepspeed", "zero_stage": 2, "num_workers": WORLD, "use_gpu": False, "timeout_s": 60}


def sweep_file(tmp_path: Path, output_dir: Path, name: str, **changes) -> Path:
    """A small copy of tuning/smoke_sharded.yaml (MLP: no BatchNorm, so sharded == single-process)."""
    raw = yaml.safe_load(Path(__file__).parents[2].joinpath("tuning", "smoke_sharded.yaml").read_text())
    raw.update({
        "name": name, "output_dir": str(output_dir),
        "base": {"seed": 0, "data": {"name": "digits", "label_noise": 0.05, "batch_size": 64, "augment": False},
                 "model": {"name": "mlp", "options": {"hidden": [64]}},
                 "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
                 "train": {"epochs": 8, "schedule": "cosine"}},
        "forget": {"kind": "memorization", "level": "high", "size": 30, "scores": "flipped"},
        "unlearn": {"optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 0.0},
                    "train": {"schedule": "constant", "grad_clip": 0.0},
                    "data": {"batch_size": PER_RANK}, "distributed": dict(SHARDED)},
    })
    raw.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory):
    """One output_dir for the module: the pretrained model and its reference are trained once (cached)."""
    return tmp_path_factory.mktemp("sharded-sweeps") / "runs"


@pytest.fixture(autouse=True)
def _no_ray_left_behind():
    yield
    if ray.is_initialized():  # a failed test must not leave its Ray instance to the next one
        ray.shutdown()


def ledger(storage: Path, name: str) -> dict[str, list[dict]]:
    out = {}
    for file in sorted((storage / name / "_sharp_unlearn" / "trainings").glob("*.jsonl")):
        out[file.stem] = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return out


def test_sharded_asha_sweep_with_mlflow_best_checkpoint_and_evaluate(tmp_path, shared_runs, capsys):
    from mlflow.tracking import MlflowClient

    from sharp_unlearn.cli import main

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    # alpha 0.95 first, then 0.5 (one trial at a time on 2 CPUs): ASHA stops the second at its first rung
    path = sweep_file(tmp_path, shared_runs, "sharded_asha", search={"method.alpha": {"grid": [0.95, 0.5]}},
                      num_samples=1)
    storage = tmp_path / "storage"
    code = main(["sweep", str(path), "--num-cpus", "2", "--storage", str(storage), "--tracking-uri", uri])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-4000:]
    assert "ZeRO-2 x 2 workers per trial" in captured.out and "best checkpoint:" in captured.out

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sharp-unlearn")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("kind") == "trial"]
    assert len(parents) == 1 and len(trials) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    # every trial reported ToW per epoch while its workers trained: ASHA compared on it and stopped some
    tow_steps = {t.data.tags["trial_id"]: [m.step for m in client.get_metric_history(t.info.run_id, "tow")]
                 for t in trials}
    stopped = [t for t in trials if t.data.tags["stopped_early"] == "true"]
    assert stopped, tow_steps
    assert all(max(tow_steps[t.data.tags["trial_id"]]) < 4 for t in stopped)
    finished = [t for t in trials if t.data.tags["stopped_early"] == "false"]
    assert finished and all(tow_steps[t.data.tags["trial_id"]] == [1, 2, 3, 4] for t in finished)
    # the workers of every trial ran on 2 ranks: each trial's ledger names a sharded start
    events = ledger(storage, "sharded_asha")
    assert len(events) == 2 and all(e[0]["event"] == "start" and e[0]["sharded"] for e in events.values())

    # table, best config and the best trial's consolidated fp32 checkpoint
    out_dir = storage / "sharded_asha"
    best_cfg = yaml.safe_load((out_dir / "best_config.yaml").read_text())
    best = [t for t in trials if t.data.tags.get("best_trial") == "true"]
    assert len(best) == 1 and best_cfg["trial_id"] == best[0].data.tags["trial_id"]
    assert best_cfg["config"]["distributed"]["backend"] == "deepspeed"
    checkpoint = out_dir / "best_checkpoint.pt"
    assert best_cfg["checkpoint"] == str(checkpoint) and checkpoint.is_file()
    assert (out_dir / "sweep_results.md").is_file() and (out_dir / "sweep_results.parquet").is_file()

    # `evaluate` loads it on one device and scores what the sharded trial reported, ToW included: the
    # export records its forget set and retrained reference as a single-process checkpoint does
    code = main(["evaluate", str(checkpoint), "--metrics", "accuracy,tow", "--json", "--no-tracking",
                 "--out", str(tmp_path / "eval")])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    headline = json.loads(captured.out)["headline"]
    for key in ("test_acc", "forget_acc", "retain_acc", "tow"):
        assert headline[key] == pytest.approx(best[0].data.metrics[key], abs=1e-4), key


def test_sharded_trial_equals_single_process(tmp_path, shared_runs):
    """Per-epoch metrics (ToW included) and final weights of a sharded trial = the same config in one process."""
    from sharp_unlearn.engine.checkpoint import load_checkpoint
    from sharp_unlearn.recipes.unlearn import Reference, load_pretrained, run_unlearning
    from sharp_unlearn.tuning import LocalSession, load_sweep, prepare_inputs, run_trial, trial_configs
    from sharp_unlearn.tuning.sharded import unlearn_run_dir

    params = {"method.alpha": 0.95, "method.rho_max": 0.05}
    spec = load_sweep(sweep_file(tmp_path, shared_runs, "equal", method={
        "name": "sharp_minmax", "epochs": 3, "alpha": 0.95, "mask_fraction": 0.5}), tracking={"enabled": False})
    inputs, context = prepare_inputs(spec, quiet=True)
    session = LocalSession("sharded")
    with ray_session(num_cpus=2, log_to_driver=False):  # as the commands start theirs
        final = run_trial(inputs, params, session)

    # the same trial config in one process, with the global batch of the two ranks
    _, cfg = trial_configs(inputs, params)
    tree = cfg.to_dict()
    tree["distributed"] = {"backend": "none"}
    tree["data"]["batch_size"] = PER_RANK * WORLD
    tree["output_dir"] = str(tmp_path / "single")
    from sharp_unlearn.config import config_from_dict

    single_cfg = config_from_dict(tree)
    pretrained = load_pretrained(context["pretrain_checkpoint"])
    ref = inputs.reference  # the sweep's own reference: the same ToW yardstick, and nothing retrained
    reference = Reference(Path(ref["checkpoint"]), dict(ref["metrics"]), ref["run_id"], ref["wall_seconds"], True)
    records = []
    single = run_unlearning(single_cfg, pretrained.path, quiet=True, pretrained=pretrained, split=inputs.split,
                            reference=reference,
                            epoch_callback=lambda epoch, record: records.append((epoch, dict(record))))

    assert [int(r["epoch"]) for r in session.reports] == [1, 2, 3]
    for report, (epoch, record) in zip(session.reports, records, strict=True):
        assert int(report["epoch"]) == epoch
        for key in ("tow", "retain_acc", "forget_acc", "val_acc", "test_acc", "train_loss"):
            assert report[key] == pytest.approx(record[key], abs=TOLERANCE), (epoch, key)
    assert final["tow"] == pytest.approx(single.metrics["tow"], abs=TOLERANCE)

    export = unlearn_run_dir(cfg, pretrained, inputs.split) / f"zero2x{WORLD}" / "unlearned_fp32.pt"
    sharded = load_checkpoint(export)["model"]
    reference = load_checkpoint(single.checkpoint)["model"]
    original = pretrained.state["model"]
    assert sharded.keys() == reference.keys()
    moved = max(float((reference[k] - original[k]).abs().max()) for k in reference)
    assert moved > 1e-3  # unlearning really changed the weights, so equality means something
    diff = max(float((sharded[k] - reference[k]).abs().max()) for k in reference)
    assert diff < TOLERANCE


def _wait_for(predicate, what: str, limit_s: float = 600.0):
    """Poll for a file event; the limit only turns a hang into a failure."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_worker_of_a_sharded_trial_is_retried_from_its_checkpoint(tmp_path, shared_runs):
    from sharp_unlearn.tuning import load_sweep, run_sweep

    path = sweep_file(tmp_path, shared_runs, "sharded_fault", scheduler="fifo",
                      method={"name": "sharp_minmax", "epochs": 6, "alpha": 0.95, "mask_fraction": 0.5},
                      search={"method.alpha": {"grid": [0.95]}}, num_samples=1)
    spec = load_sweep(path, tracking={"enabled": False}, storage=str(tmp_path / "storage"))
    trials_dir = shared_runs / "sweep-unlearn"
    known = {p for p in trials_dir.glob("*")} if trials_dir.is_dir() else set()
    killed: dict[str, object] = {}

    def kill_one_worker():
        def committed_run():
            for run in trials_dir.glob("*/zero2x2") if trials_dir.is_dir() else []:
                if run.parent in known:
                    continue
                progress = run / "deepspeed" / "progress.json"
                pid = run / "launch" / "rank1.pid"
                if progress.is_file() and pid.is_file() and json.loads(progress.read_text())["epoch"] >= 1:
                    return run
            return None

        try:
            run = _wait_for(committed_run, "a sharded trial's first committed epoch")
            killed["epoch"] = json.loads((run / "deepspeed" / "progress.json").read_text())["epoch"]
            killed["run"] = run
            os.kill(int((run / "launch" / "rank1.pid").read_text()), signal.SIGKILL)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            killed["error"] = exc

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    outcome = run_sweep(spec, num_cpus=2, quiet=True)
    killer.join(timeout=60)
    assert "error" not in killed, killed.get("error")
    assert "run" in killed

    # every trial reported once, all finished all their epochs
    assert len(outcome.rows) == 1 and all(r["status"] == "TERMINATED" and r["epochs"] == 6 for r in outcome.rows)
    events = ledger(tmp_path / "storage", "sharded_fault")
    starts = {trial: [e for e in trail if e["event"] == "start"] for trial, trail in events.items()}
    retried = [trial for trial, s in starts.items() if len(s) == 2]
    assert len(retried) == 1, starts
    # the retry resumed from the sharded checkpoint committed before the kill, not from scratch
    assert starts[retried[0]][1]["start_epoch"] >= 1
    assert all(len(s) == 1 for trial, s in starts.items() if trial not in retried)
    assert sum(1 for trail in events.values() for e in trail if e["event"] == "done") == 1
