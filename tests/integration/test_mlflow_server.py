"""A real ``mlflow server`` on 127.0.0.1: pretrain + unlearn log to it over HTTP, everything reads back,
``compare`` reproduces the logged numbers. (SIGTERM -> KILLED is tested in tests/test_tracking.py.)

The server: SQLite backend, a temporary artifact destination (artifacts travel
over HTTP), one worker, no job runner; stopped by its pid in a ``finally``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from sharp_unlearn.cli import main  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = ["train.epochs=2", "data.batch_size=64", "model.name=small_cnn", "model.options={width: 8, feature_dim: 32}",
         "tracking.experiment=integration"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _tail(path: Path) -> str:
    return path.read_text()[-3000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed in the finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'store.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # a hang guard: ~10 s idle, a minute or more under load
        while not _healthy(uri):
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{_tail(root / 'server.log')}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health in 300 s:\n{_tail(root / 'server.log')}")
            time.sleep(0.25)
        yield uri, root
    finally:
        proc.terminate()  # the main process stops its workers
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this fixture created, nothing else
            proc.wait()
        log.close()


def _cli_json(argv: list[str]) -> dict:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    assert code == 0, buffer.getvalue()
    return json.loads(buffer.getvalue())


@pytest.fixture(scope="module")
def pipeline(server, tmp_path_factory):
    uri, _ = server
    out = tmp_path_factory.mktemp("work")
    pretrain = _cli_json(["pretrain", "--quiet", "--json", "--tracking-uri", uri, f"output_dir={out / 'runs'}",
                          "seed=1", *SMALL])
    unlearn = _cli_json(["unlearn", "--quiet", "--json", "--tracking-uri", uri, "--checkpoint", pretrain["checkpoint"],
                         "method.name=neggrad", "forget.kind=random", "forget.size=50", "method.epochs=1"])
    return {"uri": uri, "out": out, "pretrain": pretrain, "unlearn": unlearn}


def test_server_was_started_with_artifact_proxying(server):
    uri, root = server
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("proxy-check")
    assert client.get_experiment(experiment_id).artifact_location.startswith("mlflow-artifacts:")
    assert (root / "store.db").is_file()


def test_pretrain_run_reads_back_over_http(pipeline, tmp_path):
    client = MlflowClient(pipeline["uri"])
    result = pipeline["pretrain"]
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert {k: tags[k] for k in ("kind", "dataset", "model", "optimizer", "seed")} == {
        "kind": "pretrain", "dataset": "digits", "model": "small_cnn", "optimizer": "sgd", "seed": "1"}
    assert tags["git_commit"]
    assert client.get_experiment(run.info.experiment_id).name == "integration"
    params = run.data.params
    assert params["train.epochs"] == "2" and params["optimizer.name"] == "sgd" and params["seed"] == "1"
    assert params["model.options.width"] == "8"
    for name in ("test_acc", "val_acc", "train_acc", "wall_seconds"):
        assert run.data.metrics[name] == pytest.approx(result[name])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")][:2] == [1, 2]
    # artifacts travel through the server (mlflow-artifacts:), the client never sees the directory
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert config["train"]["epochs"] == 2 and config["seed"] == 1
    ckpt = Path(client.download_artifacts(run.info.run_id, "checkpoint/checkpoint.pt", str(tmp_path)))
    state = torch.load(ckpt, weights_only=True)
    assert state["completed"] and "model" in state


def test_unlearn_run_reads_back_with_lineage(pipeline, tmp_path):
    client = MlflowClient(pipeline["uri"])
    result = pipeline["unlearn"]
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert {k: tags[k] for k in ("kind", "method", "optimizer", "forget_set", "dataset", "model")} == {
        "kind": "unlearn", "method": "neggrad", "optimizer": "sgd", "forget_set": "random-50", "dataset": "digits",
        "model": "small_cnn"}
    assert len(tags["split_hash"]) >= 8
    assert tags["pretrain_run_id"] == pipeline["pretrain"]["run_id"]
    reference = client.get_run(tags["reference_run_id"])
    assert reference.data.tags["kind"] == "retrain"
    assert reference.data.tags["pretrain_run_id"] == pipeline["pretrain"]["run_id"]
    assert reference.data.tags["split_hash"] == tags["split_hash"]
    assert run.data.params["method.name"] == "neggrad" and run.data.params["forget.size"] == "50"
    for name in ("tow", "forget_acc", "retain_acc", "test_acc", "wall_seconds"):
        assert run.data.metrics[name] == pytest.approx(result["metrics"][name])
    assert 0.0 <= run.data.metrics["tow"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "forget_set", "results", "checkpoint"} <= artifacts
    dest = Path(client.download_artifacts(run.info.run_id, "forget_set", str(tmp_path)))
    forget_files = list(dest.glob("*.parquet"))
    assert forget_files and pq.read_table(forget_files[0]).num_rows == 50
    results = Path(client.download_artifacts(run.info.run_id, "results", str(tmp_path)))
    rows = pq.read_table(next(results.glob("*.parquet"))).to_pylist()
    tow_row = next(r for r in rows if r["run_id"] == run.info.run_id and r["metric"] == "tow")
    assert tow_row["value"] == pytest.approx(run.data.metrics["tow"])


def test_compare_table_equals_logged_metrics(pipeline, tmp_path):
    uri = pipeline["uri"]
    client = MlflowClient(uri)
    out = tmp_path / "report"
    result = _cli_json(["compare", "--json", "--tracking-uri", uri, "--run-ids", pipeline["unlearn"]["run_id"],
                        "--with-lineage", "--out", str(out)])
    unlearn_run = client.get_run(pipeline["unlearn"]["run_id"])
    expected_ids = {unlearn_run.info.run_id, unlearn_run.data.tags["pretrain_run_id"],
                    unlearn_run.data.tags["reference_run_id"]}
    table = pq.read_table(out / "comparison.parquet").to_pylist()
    assert {row["run_id"] for row in table} == expected_ids
    checked = 0
    for row in table:
        if row["status"] == "baseline":
            continue
        logged = client.get_run(row["run_id"]).data.metrics
        for metric in ("tow", "forget_acc", "retain_acc", "test_acc", "val_acc", "wall_seconds"):
            if metric in logged:
                assert row[metric] == logged[metric]
                checked += 1
    assert checked >= 8
    # the "do nothing" row, from the unlearn run's result table, equals what the unlearn command reported
    original = next(row for row in table if row["kind"] == "original")
    assert original["status"] == "baseline" and original["run_id"] == unlearn_run.data.tags["pretrain_run_id"]
    for metric, value in pipeline["unlearn"]["original_metrics"].items():
        if metric in original:
            assert original[metric] == pytest.approx(value)
    reference = next(row for row in table if row["kind"] == "retrain")
    assert reference["forget_acc"] is not None  # filled from the result table: retrain runs do not log it
    assert {(r["kind"], r["run_id"]) for r in result["runs"]} == {(r["kind"], r["run_id"]) for r in table}
    # the report went to a kind=compare run, readable over HTTP
    report_run = client.get_run(result["logged_to"])
    assert report_run.data.tags["kind"] == "compare" and report_run.info.status == "FINISHED"
    html = Path(client.download_artifacts(report_run.info.run_id, "compare/report.html", str(tmp_path))).read_text()
    assert "data:image/png;base64," in html and unlearn_run.info.run_id in html

