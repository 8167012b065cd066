"""MLflow tracking: what a run holds, how it ends, where it goes, and failing fast.

A fresh SQLite store costs ~7 s of schema migrations, so one migrated store is
made per session and copied for each test (a file copy).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from sharp_unlearn import tracking  # noqa: E402
from sharp_unlearn.errors import ConfigError  # noqa: E402
from sharp_unlearn.tracking import NullTracker, lineage, open_run, preflight, tracked_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mlflow-template") / "mlruns.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates and migrates the schema
    return path


@pytest.fixture
def uri(template_db, tmp_path, monkeypatch) -> str:
    db = tmp_path / "store" / "mlruns.db"
    db.parent.mkdir()
    shutil.copy(template_db, db)
    value = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", value)
    return value


@pytest.fixture
def client(uri) -> MlflowClient:
    return MlflowClient(uri)


def _tracked_cfg(small_cfg, uri, *overrides):
    return small_cfg("tracking.enabled=true", f"tracking.uri={uri}", "tracking.experiment=tests", *overrides)


def test_open_run_logs_resolved_config_contract_tags_and_finishes(small_cfg, uri, client, tmp_path):
    cfg = _tracked_cfg(small_cfg, uri, "method.name=neggrad", "forget.kind=random", "forget.size=50",
                       "optimizer.name=sam", "optimizer.rho=0.1", "seed=3")
    with open_run(cfg, kind="unlearn", tags={"split_hash": "abc123", "pretrain_run_id": "p1",
                                             "reference_run_id": None}) as tracker:
        run_id = tracker.run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in cfg.flat().items()}
    assert run.data.params["optimizer.rho"] == "0.1"
    tags = run.data.tags
    assert {k: tags[k] for k in ("kind", "method", "optimizer", "dataset", "model", "forget_set", "seed",
                                 "split_hash", "pretrain_run_id")} == {
        "kind": "unlearn", "method": "neggrad", "optimizer": "sam", "dataset": "digits", "model": "small_cnn",
        "forget_set": "random-50", "seed": "3", "split_hash": "abc123", "pretrain_run_id": "p1"}
    assert "reference_run_id" not in tags  # None values are not written as the string "None"
    assert tags["git_commit"] == "unknown" or len(tags["git_commit"]) == 40
    config_file = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
    assert yaml.safe_load(config_file.read_text()) == yaml.safe_load(cfg.to_yaml())
    assert client.get_experiment(run.info.experiment_id).name == "tests"


def test_pretrain_kind_carries_no_method_or_forget_set(small_cfg, uri, client):
    cfg = _tracked_cfg(small_cfg, uri, "method.name=neggrad", "forget.kind=random", "forget.size=50")
    with open_run(cfg, kind="pretrain") as tracker:
        pass
    tags = client.get_run(tracker.run_id).data.tags
    assert tags["kind"] == "pretrain" and "method" not in tags and "forget_set" not in tags


def test_final_metrics_win_over_per_epoch_values(small_cfg, uri, client):
    cfg = _tracked_cfg(small_cfg, uri)
    with open_run(cfg, kind="pretrain") as tracker:
        for epoch, acc in enumerate([30.0, 50.0, 70.0], start=1):
            tracker.log_metrics({"val_acc": acc, "train_loss": 1.0 / epoch}, step=epoch)
        tracker.log_metrics({"val_acc": 69.5, "test_acc": 68.0, "skipped": float("nan")})  # final values
    run = client.get_run(tracker.run_id)
    assert run.data.metrics["val_acc"] == 69.5  # not the last epoch's 70.0
    assert run.data.metrics["test_acc"] == 68.0
    assert "skipped" not in run.data.metrics
    history = client.get_metric_history(tracker.run_id, "val_acc")
    assert [(m.step, m.value) for m in history] == [(1, 30.0), (2, 50.0), (3, 70.0), (3, 69.5)]


def test_exception_ends_failed_with_error_tag_and_traceback(small_cfg, uri, client, tmp_path):
    cfg = _tracked_cfg(small_cfg, uri)
    with pytest.raises(RuntimeError, match="loss exploded"):
        with open_run(cfg, kind="pretrain") as tracker:
            raise RuntimeError("loss exploded at epoch 3")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: loss exploded at epoch 3"
    text = Path(client.download_artifacts(tracker.run_id, "error.txt", str(tmp_path))).read_text()
    assert "Traceback" in text and "loss exploded" in text


def test_keyboard_interrupt_ends_killed(small_cfg, uri, client):
    cfg = _tracked_cfg(small_cfg, uri)
    with pytest.raises(KeyboardInterrupt):
        with open_run(cfg, kind="pretrain") as tracker:
            raise KeyboardInterrupt
    run = client.get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["interrupted"] == "KeyboardInterrupt"


@pytest.mark.slow  # a Python subprocess importing mlflow: ~5-10 s on 2 cores
def test_sigterm_ends_run_killed(uri, client, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from sharp_unlearn.tracking import tracked_run
        with tracked_run(uri={uri!r}, experiment="tests", kind="pretrain") as tracker:
            print(tracker.run_id, flush=True)
            step = 0
            while True:
                step += 1
                tracker.log_metrics({{"train_loss": 1.0 / step}}, step=step)
                time.sleep(0.05)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id, proc.stderr.read()
        # hang guards, not bounds: at load 10+ on 2 cores the child's first metric and its exit (ending the
        # run, unloading mlflow) each took more than 30 s
        deadline = time.monotonic() + 180
        while not client.get_metric_history(run_id, "train_loss") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get_run(run_id).info.status == "RUNNING"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["interrupted"] == "SIGTERM"


def test_disabled_tracking_and_nonzero_rank_log_nothing(small_cfg, uri, client, monkeypatch):
    with open_run(small_cfg(), kind="pretrain") as tracker:  # small_cfg has tracking.enabled=false
        tracker.log_metrics({"val_acc": 1.0})
    assert isinstance(tracker, NullTracker) and tracker.run_id is None
    monkeypatch.setenv("RANK", "1")
    with open_run(_tracked_cfg(small_cfg, uri), kind="pretrain") as tracker:
        tracker.log_metrics({"val_acc": 1.0})
        tracker.log_table([{"a": 1}], "t")
    assert tracker.run_id is None
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_unreachable_server_fails_fast_with_config_error(free_port, monkeypatch):
    import urllib.request

    import mlflow.utils.rest_utils

    calls = []  # MLflow's client retries a dead server for minutes: the preflight must never go through it
    monkeypatch.setattr(mlflow.utils.rest_utils, "http_request", lambda *a, **k: calls.append(a))
    probes = []  # fast = one bounded attempt, no retries (counted, not timed: timing fails under load)
    real_urlopen = urllib.request.urlopen

    def counted_urlopen(request, *args, **kwargs):
        probes.append(kwargs.get("timeout", args[1] if len(args) > 1 else None))
        return real_urlopen(request, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", counted_urlopen)
    uri = f"http://127.0.0.1:{free_port}"
    with pytest.raises(ConfigError, match="unreachable") as info:
        preflight(uri)
    assert calls == []
    assert probes == [5.0]  # one refused connection, with a timeout
    assert uri in str(info.value) and "--no-tracking" in str(info.value)


def test_cli_exits_2_before_training_when_server_unreachable(free_port, tmp_path, capsys):
    from sharp_unlearn.cli import main

    out = tmp_path / "runs"
    code = main(["pretrain", "--quiet", "--tracking-uri", f"http://127.0.0.1:{free_port}", f"output_dir={out}",
                 "train.epochs=50", "model.options={width: 8, feature_dim: 32}"])
    assert code == 2
    assert f"http://127.0.0.1:{free_port}" in capsys.readouterr().err
    assert not list(out.rglob("checkpoint.pt"))  # stopped before the first epoch, not after 50


def test_check_tracking_follows_the_config(small_cfg, free_port, uri):
    from sharp_unlearn.tracking import check_tracking

    assert check_tracking(small_cfg()) is None  # tracking off: nothing to check
    assert check_tracking(_tracked_cfg(small_cfg, uri)) == uri
    with pytest.raises(ConfigError, match="unreachable"):
        check_tracking(_tracked_cfg(small_cfg, f"http://127.0.0.1:{free_port}"))


def test_bad_sqlite_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        preflight(f"sqlite:///{tmp_path}/missing/dir/mlruns.db")


def test_default_store_is_sqlite_in_working_directory(template_db, tmp_path, monkeypatch, small_cfg):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(template_db, tmp_path / "mlruns.db")  # skip the schema migration; where runs land is the point
    assert tracking.resolve_uri(None) == "sqlite:///mlruns.db"
    cfg = small_cfg("tracking.enabled=true")
    with open_run(cfg, kind="pretrain") as tracker:
        tracker.log_metrics({"test_acc": 91.0})
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}").get_run(tracker.run_id)
    assert run.data.metrics == {"test_acc": 91.0}
    # artifacts beside the database, not in MLflow's ./mlruns default
    assert (tmp_path / "mlartifacts" / "sharp-unlearn" / tracker.run_id / "artifacts" / "config.yaml").is_file()
    assert not (tmp_path / "mlruns").exists()


def test_large_checkpoint_is_logged_as_reference(small_cfg, uri, client, tmp_path):
    cfg = _tracked_cfg(small_cfg, uri, "tracking.max_artifact_mb=0.01")  # 10 KiB
    big, small = tmp_path / "big.pt", tmp_path / "small.pt"
    big.write_bytes(b"x" * 20_000)
    small.write_bytes(b"y" * 100)
    with open_run(cfg, kind="pretrain") as tracker:
        assert tracker.log_checkpoint(big) is False
        assert tracker.log_checkpoint(small) is True
    run = client.get_run(tracker.run_id)
    assert run.data.tags["artifact_ref.big.pt"] == str(big.resolve())
    names = {a.path for a in client.list_artifacts(tracker.run_id, "checkpoint")}
    assert names == {"checkpoint/big.pt.ref.json", "checkpoint/small.pt"}
    ref = Path(client.download_artifacts(tracker.run_id, "checkpoint/big.pt.ref.json", str(tmp_path)))
    assert '"bytes": 20000' in ref.read_text()


def test_tables_indices_and_figures_are_logged_as_files(small_cfg, uri, client, tmp_path):
    import pyarrow.parquet as pq
    from matplotlib.figure import Figure

    cfg = _tracked_cfg(small_cfg, uri)
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    with open_run(cfg, kind="unlearn") as tracker:
        tracker.log_indices([7, 3, 11], score=[0.9, 0.5, 0.1])
        tracker.log_table([{"metric": "tow", "value": 0.93}], "results")
        tracker.log_figure(fig, "curve")
        tracker.log_dict({"a": (1, 2)}, "extra.yaml")
    dest = Path(client.download_artifacts(tracker.run_id, "", str(tmp_path / "dl")))
    forget = pq.read_table(dest / "forget_set" / "forget_indices.parquet").to_pydict()
    assert forget == {"index": [7, 3, 11], "score": [0.9, 0.5, 0.1]}
    assert pq.read_table(dest / "tables" / "results.parquet").to_pylist() == [{"metric": "tow", "value": 0.93}]
    assert (dest / "figures" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((dest / "extra.yaml").read_text()) == {"a": [1, 2]}


def test_lineage_walks_pretrain_and_reference_runs(uri, client):
    common = dict(uri=uri, experiment="tests")
    with tracked_run(kind="pretrain", **common) as pre:
        pass
    with tracked_run(kind="retrain", tags={"pretrain_run_id": pre.run_id}, **common) as ref:
        pass
    with tracked_run(kind="unlearn", tags={"pretrain_run_id": pre.run_id, "reference_run_id": ref.run_id},
                     **common) as unl:
        pass
    chain = [(role, run.info.run_id) for role, run in lineage(client, unl.run_id)]
    assert chain == [("self", unl.run_id), ("pretrain_run_id", pre.run_id), ("reference_run_id", ref.run_id)]


def test_parent_run_id_nests_the_run(uri, client):
    with tracked_run(uri=uri, experiment="tests", kind="sweep") as parent:
        with tracked_run(uri=uri, experiment="tests", kind="trial", parent_run_id=parent.run_id) as child:
            pass
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert client.get_run(parent.run_id).info.status == "FINISHED"


def test_pretrain_logs_epochs_final_metrics_and_checkpoint(small_cfg, uri, client):
    from sharp_unlearn.recipes.pretrain import train_from_scratch

    cfg = _tracked_cfg(small_cfg, uri, "train.epochs=2")
    outcome = train_from_scratch(cfg, quiet=True, use_cache=False)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "pretrain"
    assert [m.step for m in client.get_metric_history(outcome.run_id, "train_loss")][:2] == [1, 2]
    for name in ("test_acc", "val_acc", "train_acc", "wall_seconds"):
        assert run.data.metrics[name] == pytest.approx(outcome.metrics[name])
    assert "checkpoint/checkpoint.pt" in {a.path for a in client.list_artifacts(outcome.run_id, "checkpoint")}


def test_rank_check_reads_rank_environment(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert tracking.is_rank_zero()
    monkeypatch.setenv("RANK", "2")
    assert not tracking.is_rank_zero()


@pytest.mark.parametrize("env_uri", [None, "sqlite:///elsewhere.db"])
def test_uri_precedence(monkeypatch, env_uri):
    if env_uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri("http://127.0.0.1:1") == "http://127.0.0.1:1"
    assert tracking.resolve_uri(None) == (env_uri or "sqlite:///mlruns.db")
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_uri


@pytest.mark.slow  # a CLI subprocess: torch import + data + a few epochs
def test_sigterm_to_the_pretrain_command_ends_its_run_killed(uri, client, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "sharp_unlearn", "pretrain", "--quiet", "--tracking-uri", uri,
         f"output_dir={tmp_path / 'runs'}", "tracking.experiment=sigterm", "train.epochs=5000",
         "model.options={width: 8, feature_dim: 32}"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.monotonic() + 300  # a hang guard: torch + mlflow imports and an epoch, at load 10+
        run = None
        while run is None and time.monotonic() < deadline and proc.poll() is None:
            experiment = client.get_experiment_by_name("sigterm")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and client.get_metric_history(runs[0].info.run_id, "train_loss"):
                run = runs[0]  # at least one epoch logged: training is under way
            time.sleep(0.3)
        assert run is not None, proc.stderr.read() if proc.poll() is not None else "no epoch logged in 300 s"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130  # the CLI's "interrupted" code
    final = client.get_run(run.info.run_id)
    assert final.info.status == "KILLED" and final.data.tags["interrupted"] == "SIGTERM"
