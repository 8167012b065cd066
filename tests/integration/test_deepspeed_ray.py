"""Ray Train with 2 CPU workers: `sharp-unlearn pretrain ... distributed.backend=deepspeed` completes,
logs to MLflow once (rank 0), and its consolidated checkpoint evaluates on one device; a Ray Tune
trial can run DeepSpeed workers and sees every epoch's record.

A real local Ray cluster (2 CPUs) and real DeepSpeed (ZeRO-3, gloo); shut down at the end.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("deepspeed")  # the `deepspeed` extra

EPOCHS = 3
BASE = ["data.batch_size=32", "model.name=mlp", "model.options={hidden: [64]}", f"train.epochs={EPOCHS}",
        "optimizer.name=sam", "optimizer.lr=0.1", "distributed.backend=deepspeed", "distributed.zero_stage=3",
        "distributed.num_workers=2", "distributed.launcher=ray", "distributed.timeout_s=60"]


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray")
    from sharp_unlearn.ray_cluster import ray_session

    with ray_session(num_cpus=2, log_to_driver=False) as ray:  # as the commands start theirs
        yield ray


@pytest.mark.distributed
@pytest.mark.integration
@pytest.mark.slow
def test_ray_train_run_logs_once_and_its_checkpoint_evaluates(ray_cluster, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from sharp_unlearn.cli import main
    from sharp_unlearn.data import build_dataset
    from sharp_unlearn.engine.loop import accuracy
    from sharp_unlearn.stage_checkpoints import load_trained_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["pretrain", "--json", "--quiet", f"output_dir={tmp_path / 'runs'}", f"tracking.uri={uri}", *BASE])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out)
    assert result["test_acc"] > 30.0  # 3 epochs of SAM on digits: far above chance (10 %)

    client = MlflowClient(uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) == 1  # rank 0 only
    run = runs[0]
    assert run.info.run_id == result["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["kind"] == "pretrain" and run.data.tags["optimizer"] == "sam"
    assert run.data.tags["distributed"] == "deepspeed-zero3x2"
    assert run.data.params["distributed.zero_stage"] == "3"
    # one value per epoch plus the final one: a second rank logging would double these
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == EPOCHS + 1
    assert len(client.get_metric_history(run.info.run_id, "test_acc")) == 1
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"checkpoint", "config.yaml"}

    # the consolidated fp32 checkpoint loads on one device and scores what the workers measured
    model, cfg, state = load_trained_model(result["checkpoint"])
    assert state["completed"] and state["run_id"] == run.info.run_id
    bundle = build_dataset(cfg.data, cfg.seed)
    assert accuracy(model, bundle.test) == pytest.approx(result["test_acc"], abs=1e-4)
    code = main(["evaluate", result["checkpoint"], "--metrics", "accuracy", "--json", "--no-tracking",
                 "--out", str(tmp_path / "eval")])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert json.loads(captured.out)["headline"]["test_acc"] == pytest.approx(result["test_acc"], abs=1e-4)


@pytest.mark.distributed
@pytest.mark.integration
@pytest.mark.slow
def test_tune_trial_runs_deepspeed_workers(ray_cluster, tmp_path):
    from ray import tune

    from sharp_unlearn.config import load_config
    from sharp_unlearn.recipes.distributed import run_deepspeed_trial

    out = str(tmp_path / "runs")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def trainable(config):
        cfg = load_config([], BASE + [f"output_dir={out}", f"tracking.uri={uri}", f"optimizer.rho={config['rho']}"])
        # 2 workers x 0.99 CPU + the trial's 0.01 fit the 2-CPU cluster
        outcome = run_deepspeed_trial(cfg, cpus_per_worker=0.99, name=f"rho{config['rho']}")
        return {"final_test_acc": outcome["metrics"]["test_acc"]}

    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 0.01}),
                       param_space={"rho": tune.grid_search([0.1])},
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="ds-trial"))
    results = tuner.fit()
    trial = results[0]
    assert trial.error is None, trial.error
    assert trial.metrics["final_test_acc"] > 30.0
    frame = trial.metrics_dataframe
    assert list(frame["epoch"].dropna().astype(int)) == list(range(1, EPOCHS + 1))  # live per-epoch reports
    assert frame["val_acc"].notna().sum() == EPOCHS
