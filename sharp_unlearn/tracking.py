"""MLflow tracking: one run per command, params/tags/metrics/artifacts, rank 0 only.

``open_run(cfg, kind=...)`` is a context manager yielding a tracker. With
tracking disabled (or on a rank other than 0) it yields a :class:`NullTracker`
with the same methods, so recipes never branch on it.

Run status: an exception inside the block ends the run FAILED with the error
text in the ``error`` tag; KeyboardInterrupt / SIGTERM end it KILLED; only a
clean exit ends it FINISHED. mlflow is imported lazily (extra ``mlflow``).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from sharp_unlearn.errors import ConfigError, MissingExtra

DEFAULT_URI = "sqlite:///mlruns.db"


def resolve_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class NullTracker:
    """Same interface as MlflowTracker, records nothing (tracking off, or rank > 0)."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...


class MlflowTracker(NullTracker):
    def __init__(self, client, run_id: str, max_artifact_mb: float = 200.0):
        self.client = client
        self.run_id = run_id
        self.max_artifact_mb = max_artifact_mb

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if v is not None and v == v]  # NaN-free
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_file() and path.stat().st_size > self.max_artifact_mb * 2**20:
            # large checkpoints are referenced, not copied
            self.set_tags({f"artifact_ref.{path.name}": str(path.resolve())})
            return
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before any training) when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status != 200:
                raise ConfigError(f"MLflow tracking server {uri!r} answered /health with {response.status}")
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(f"MLflow tracking server {uri!r} is unreachable ({exc}); "
                          "start it (see mlflow/README.md) or set tracking.enabled=false") from None


@contextlib.contextmanager
def open_run(cfg, kind: str, tags: Mapping[str, Any] | None = None, run_name: str | None = None,
             parent_run_id: str | None = None, log_config: bool = True) -> Iterator[NullTracker]:
    """Open an MLflow run for one command; yields a tracker (NullTracker when off)."""
    tracking = cfg.tracking
    if not tracking.enabled or not is_rank_zero():
        yield NullTracker()
        return
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise MissingExtra("mlflow", "mlflow") from exc
    uri = resolve_uri(tracking.uri)
    check_server(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(tracking.experiment)
    all_tags = {"kind": kind, "seed": cfg.seed, "dataset": cfg.data.name, "model": cfg.model.name,
                "git_commit": git_commit()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags.update({k: v for k, v in (tags or {}).items() if v is not None})
    run = client.create_run(experiment_id, run_name=run_name or kind,
                            tags={k: str(v) for k, v in all_tags.items()})
    tracker = MlflowTracker(client, run.info.run_id, tracking.max_artifact_mb)
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):  # turn SIGTERM into an exception we can mark KILLED
        raise KeyboardInterrupt("SIGTERM")

    installed = False
    try:
        signal.signal(signal.SIGTERM, on_sigterm)
        installed = True
    except ValueError:  # not the main thread (e.g. inside a Ray worker thread)
        pass
    status = "FAILED"
    try:
        if log_config:
            tracker.log_params(cfg.flat())
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.yaml"
                path.write_text(cfg.to_yaml())
                tracker.log_artifact(path)
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as exc:
        with contextlib.suppress(Exception):
            tracker.set_tags({"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        with contextlib.suppress(Exception):
            client.set_terminated(run.info.run_id, status=status)
        if installed:
            signal.signal(signal.SIGTERM, previous)
