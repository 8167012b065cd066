"""MLflow as its users see it: one parent per demo, unique names, forgetting curves, logged and registered models."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from bad_input.harness import run_cli

TINY = ["base.train.epochs=2", "base.model.options={width: 8, feature_dim: 32}"]


def _all_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments, max_results=1000)


@pytest.mark.slow
def test_demo_is_one_parent_with_uniquely_named_children_curves_and_models(tmp_path):
    from sharp_unlearn.recipes.demo import run_demo

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    # both pretraining optimizers (their runs' names collided before), one method and optimizer: cheap
    result = run_demo(None, [*TINY, "unlearn_optimizers=[sgd]"], output_dir=str(tmp_path / "runs"),
                      tracking={"uri": uri}, methods=["neggrad"], quiet=True, evaluate=False)
    assert result.rows

    client, runs = _all_runs(uri)
    parents = [r for r in runs if r.data.tags.get("kind") == "demo"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.info.run_id != parent.info.run_id]
    # 2 pretrained models, 2 retrained references, neggrad-sgd on the sgd- and the sam-pretrained model
    assert sorted(r.data.tags["kind"] for r in children) == ["pretrain"] * 2 + ["retrain"] * 2 + ["unlearn"] * 2
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in children)
    names = [r.info.run_name for r in runs]
    assert len(set(names)) == len(names), names
    unlearn_names = sorted(r.info.run_name for r in children if r.data.tags["kind"] == "unlearn")
    assert unlearn_names == ["pre-sam/neggrad-sgd/memorization-high-60", "pre-sgd/neggrad-sgd/memorization-high-60"]

    # the ToW table as an MLflow table (the UI previews it) plus CSV, and its figure, on the parent
    logged = json.loads(parent.data.tags["mlflow.loggedArtifacts"])
    assert {"path": "tables/demo_tow.json", "type": "table"} in logged
    parent_files = {a.path for folder in ("tables", "figures", "results")
                    for a in client.list_artifacts(parent.info.run_id, folder)}
    assert {"tables/demo_tow.json", "tables/demo_tow.csv", "figures/demo_tow.png"} <= parent_files
    from mlflow.artifacts import download_artifacts

    table_file = download_artifacts(run_id=parent.info.run_id, artifact_path="tables/demo_tow.json",
                                    dst_path=str(tmp_path / "dl"), tracking_uri=uri)
    table = json.loads(Path(table_file).read_text())
    assert "tow" in table["columns"] and len(table["data"]) == len(result.rows)

    for run in children:
        # every trained model is an MLflow model ("Logged models" in the UI)
        assert run.data.tags.get("logged_model_uri", "").startswith("models:/"), run.info.run_name
        if run.data.tags["kind"] != "unlearn":
            continue
        run_id = run.info.run_id
        for metric in ("forget_acc", "retain_acc", "test_acc", "tow"):
            steps = {m.step for m in client.get_metric_history(run_id, metric)}
            assert len(steps) >= 2, (run.info.run_name, metric, steps)  # a forgetting curve, not one point
        files = {a.path for folder in ("results", "figures", "forget_set")
                 for a in client.list_artifacts(run_id, folder)}
        assert {"results/results.parquet", "results/results.csv", "results/results.json",
                "forget_set/forget_set.csv", "figures/forgetting_curve.png"} <= files


@pytest.mark.slow
def test_registered_model_evaluates_like_its_checkpoint_file(tmp_path):
    from sharp_unlearn.config import load_config
    from sharp_unlearn.recipes.pretrain import train_from_scratch

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = load_config([], [f"output_dir={tmp_path / 'runs'}", f"tracking.uri={uri}", "train.epochs=2",
                           "model.name=small_cnn", "model.options={width: 8, feature_dim: 32}"])
    pretrained = train_from_scratch(cfg, quiet=True)
    assert pretrained.run_id

    # unlearn from the *logged* pretrained model (runs:/) and register the result
    proc = run_cli(["unlearn", "--json", "--quiet", "--tracking-uri", uri, "--checkpoint",
                    f"runs:/{pretrained.run_id}/model", "--register", "digits-neggrad", "method.name=neggrad",
                    "method.epochs=2", "forget.kind=random", "forget.size=40"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reply = json.loads(proc.stdout)
    assert reply["registered"] == {"name": "digits-neggrad", "version": 1, "uri": "models:/digits-neggrad/1"}
    assert not (tmp_path / "mlflow.db").exists()  # the registry is the tracking store, not MLflow's default

    from mlflow.tracking import MlflowClient

    version = MlflowClient(uri, registry_uri=uri).get_model_version("digits-neggrad", "1")
    assert version.tags["method"] == "neggrad" and version.tags["forget_set"] == "random-40"
    assert version.tags["pretrain_run_id"] == pretrained.run_id
    assert re.fullmatch(r"[0-9a-f]{32}", version.tags["reference_run_id"])
    assert version.run_id == reply["run_id"]

    evaluated = {}
    for name, target in (("registered", ["--checkpoint", "models:/digits-neggrad/1"]),
                         ("file", [reply["checkpoint"], "--out", str(tmp_path / "eval-file")])):
        proc = run_cli(["evaluate", "--json", "--quiet", "--no-tracking", "--tracking-uri", uri, *target,
                        "--metrics", "accuracy"], tmp_path)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        evaluated[name] = json.loads(proc.stdout)["headline"]
        if name == "registered":  # results land with the user's runs, not in the model download cache
            out_dir = Path(json.loads(proc.stdout)["out_dir"])
            assert "sharp-unlearn-models" not in out_dir.parts and (out_dir / "results.parquet").is_file()
    assert evaluated["registered"]["test_acc"] == evaluated["file"]["test_acc"]
    assert evaluated["registered"] == evaluated["file"]
    assert evaluated["file"]["forget_acc"] == pytest.approx(reply["metrics"]["forget_acc"])


def test_unknown_model_uri_is_a_config_error(tmp_path):
    from sharp_unlearn.errors import ConfigError
    from sharp_unlearn.model_store import resolve_checkpoint
    from sharp_unlearn.tracking import client_for

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client_for(uri)
    assert str(resolve_checkpoint(tmp_path / "ckpt.pt", uri)) == str(tmp_path / "ckpt.pt")  # paths pass through
    with pytest.raises(ConfigError, match="models:/nope/1"):
        resolve_checkpoint("models:/nope/1", uri)
    with pytest.raises(ConfigError, match="runs:/0123456789abcdef0123456789abcdef/model"):
        resolve_checkpoint("runs:/0123456789abcdef0123456789abcdef/model", uri)


@pytest.mark.slow
def test_per_epoch_evaluation_of_a_tracked_run_does_not_change_the_model(tmp_path):
    """Tracking adds an evaluation every epoch (the forgetting curve); the unlearned model must not change."""
    from sharp_unlearn.config import config_from_dict, load_config, merge
    from sharp_unlearn.recipes.pretrain import train_from_scratch
    from sharp_unlearn.recipes.unlearn import load_pretrained, run_unlearning, unlearn_config

    pre = train_from_scratch(load_config([], [f"output_dir={tmp_path / 'runs'}", "tracking.enabled=false",
                                              "train.epochs=2", "model.name=small_cnn",
                                              "model.options={width: 8, feature_dim: 32}"]), quiet=True)
    outcomes = {}
    for tracked in (False, True):
        pretrained = load_pretrained(pre.checkpoint)
        tree = merge(unlearn_config(pretrained), {
            "method": {"name": "neggrad", "epochs": 2}, "forget": {"kind": "random", "size": 40},
            "output_dir": str(tmp_path / f"runs-{tracked}"),
            "tracking": {"enabled": tracked, "uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "log_models": False}})
        outcomes[tracked] = run_unlearning(config_from_dict(tree), pre.checkpoint, quiet=True, pretrained=pretrained)
    assert outcomes[True].run_id and outcomes[False].run_id is None
    assert [m.get("forget_acc") for m in outcomes[True].history] != [None, None]  # it did evaluate every epoch
    for key in ("retain_acc", "forget_acc", "test_acc", "tow"):
        assert outcomes[True].metrics[key] == outcomes[False].metrics[key], key
