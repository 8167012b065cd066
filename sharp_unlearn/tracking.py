"""MLflow tracking: one run per command, params/tags/metrics/artifacts, rank 0 only.

``open_run(cfg, kind=...)`` is a context manager yielding a tracker. With
tracking disabled (or on a rank other than 0) it yields a :class:`NullTracker`
with the same methods, so recipes never branch on it.

Where runs go: ``cfg.tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///mlruns.db`` in the working directory. For a SQLite store the
artifacts are written next to the database (``mlartifacts/``), not into
MLflow's default ``./mlruns`` of whatever directory the process runs in.

Run status: an exception inside the block ends the run FAILED with the error
text in the ``error`` tag (and the traceback as ``error.txt``);
KeyboardInterrupt / SIGTERM end it KILLED; only a clean exit ends it FINISHED.

Fail fast: an HTTP tracking server that does not answer ``/health`` (or a
store that cannot be opened) raises :class:`ConfigError` when the run is
opened, which recipes do before their first epoch; commands that chain
several stages can call :func:`preflight` before the first one.

Metric names, tag names and params are a contract (the README's "Names users query").
mlflow is imported lazily (extra ``mlflow``).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import getpass
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sharp_unlearn.errors import (
    ConfigError,
    MissingExtra,
    Terminated,
    handle_sigterm,
    note_termination,
    termination_requested,
)
from sharp_unlearn.files import atomic_path

DEFAULT_URI = "sqlite:///mlruns.db"

#: values of the ``kind`` tag (the README's "Names users query"; ``compare`` marks report runs)
KINDS = ("pretrain", "retrain", "mask", "unlearn", "evaluate", "sweep", "trial", "memorization", "compare",
         "demo", "reproduce")

#: MLflow's limits (mlflow.utils.validation): params per batch, metrics per batch, value lengths
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_MAX_PARAM_CHARS = 6000
_MAX_TAG_CHARS = 5000


# --------------------------------------------------------------------------- where runs go
#: URI schemes MLflow's tracking stores accept (a database URI may add a driver: ``postgresql+psycopg2``)
URI_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def resolve_uri(uri: str | None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    check_uri(uri)
    return uri


def check_uri(uri: str) -> None:
    """Refuse a tracking URI no MLflow store can open (ConfigError, before anything is written).

    A plain path is MLflow's file store and is accepted; ``C:\\...`` is a path, not a scheme.
    """
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    if match is None or len(match.group(1)) == 1:
        return
    scheme = match.group(1).lower()
    if scheme.split("+", 1)[0] not in URI_SCHEMES:
        raise ConfigError(f"tracking URI {uri!r} has an unsupported scheme {scheme!r}; expected one of "
                          f"{', '.join(URI_SCHEMES)} (e.g. sqlite:///mlruns.db or http://HOST:5000), "
                          "or disable tracking (--no-tracking)")
    if scheme == "sqlite" and sqlite_path(uri) is None:
        raise ConfigError(f"tracking URI {uri!r} names no database file; expected sqlite:///RELATIVE/PATH.db "
                          "or sqlite:////ABSOLUTE/PATH.db")


def check_experiment_name(name: str) -> None:
    """An experiment name becomes a folder under ``mlartifacts/``: it must never lead out of it."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"tracking.experiment={name!r} is empty; expected a name such as 'sharp-unlearn'")
    if any(part in (".", "..") for part in re.split(r"[\\/]", name)):
        raise ConfigError(f"tracking.experiment={name!r} has a '.' or '..' path part; expected a plain name "
                          "such as 'sharp-unlearn' (letters, digits, '-', '_', '.')")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def is_rank_zero() -> bool:
    """True unless this process is a non-zero rank of a multi-process run.

    Reads ``RANK`` (torchrun, DeepSpeed, Ray Train set it) and, when a process
    group is already up, asks torch.distributed directly.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return False
    dist = sys.modules.get("torch.distributed")  # only if torch is already imported: no import cost here
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except (RuntimeError, ValueError):  # a half-torn-down group: trust the environment
        pass
    return True


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the sharp_unlearn checkout ('unknown' for an installed wheel)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before any training) when an HTTP tracking server does not answer its API.

    One real API call (an experiments search, the first thing a run needs) with
    a short timeout and no retries: MLflow's own client retries a hanging or
    failing server with exponential backoff for minutes, and ``/health`` can
    answer 200 while the API behind it hangs or fails.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import base64
    import urllib.error
    import urllib.request

    hint = ("start it (see mlflow/README.md), point --tracking-uri / MLFLOW_TRACKING_URI at a running "
            "server, or disable tracking (--no-tracking, tracking.enabled=false)")
    headers = {"Content-Type": "application/json"}
    # the API (unlike /health) may need the same credentials MLflow's client would send
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
                                     data=b'{"max_results": 1}', headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status
            response.read()
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:  # refused, unknown host, or no answer within the timeout
        reason = getattr(exc, "reason", None) or exc or type(exc).__name__
        raise ConfigError(f"MLflow tracking server {uri!r} is unreachable or does not answer within "
                          f"{timeout:g} s ({reason}); {hint}") from None
    if status != 200:
        raise ConfigError(f"MLflow tracking server {uri!r} answered its experiments API with HTTP {status}; {hint}")


#: databases whose tables this process has already created or checked (resolved paths)
_READY_STORES: set[Path] = set()
#: how long a process waits for another one that is creating the same store
_STORE_LOCK_TIMEOUT_S = 300.0


def ensure_store(uri: str) -> None:
    """Create a ``sqlite:///`` store's tables exactly once, under an inter-process file lock.

    MLflow creates a fresh database by running its schema migrations in
    whichever process opens it first; two processes doing that at the same
    moment (a sweep's workers, two commands started together in one folder)
    race and one of them fails. Holding ``<database>.lock`` while the store is
    opened makes one process migrate and the others find it ready. Cheap after
    the first call per database in a process; other URIs are left to MLflow.
    """
    db = sqlite_path(uri)
    if db is None:
        return
    db = db.resolve()
    if db in _READY_STORES:
        return
    if not db.parent.is_dir():
        raise ConfigError(f"tracking URI {uri!r}: directory {str(db.parent)!r} does not exist")
    from filelock import FileLock, Timeout

    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    except ImportError as exc:
        raise MissingExtra("mlflow", "mlflow") from exc
    lock_path = db.with_name(db.name + ".lock")
    # artifacts of the default experiment go next to the database too, never into the cwd
    artifact_root = (db.parent / "mlartifacts").as_uri()
    try:
        with FileLock(str(lock_path), timeout=_STORE_LOCK_TIMEOUT_S):
            if not db.exists():
                _create_store(db, artifact_root, SqlAlchemyStore)
            store = _retry_locked(SqlAlchemyStore, "sqlite:///" + str(db), artifact_root)
            store.engine.dispose()
    except Timeout:
        raise ConfigError(f"tracking URI {uri!r}: another process has held {str(lock_path)!r} for over "
                          f"{_STORE_LOCK_TIMEOUT_S:g} s; if none is running, delete that file") from None
    _READY_STORES.add(db)


def _create_store(db: Path, artifact_root: str, store_class) -> None:
    """Build a new store's schema in a side file, then rename it into place.

    MLflow's migrations take seconds; a command interrupted in the middle of them (Ctrl-C on the first
    command in a folder) would otherwise leave a half-migrated database that every later command
    refuses. The rename makes the store appear complete or not at all.
    """
    with atomic_path(db) as building:
        try:
            store_class("sqlite:///" + str(building), artifact_root).engine.dispose()
        finally:  # SQLite's rollback journal of a side file interrupted mid-migration
            building.with_name(building.name + "-journal").unlink(missing_ok=True)


#: tries and first pause for a write SQLite refuses with "database is locked" (another process's transaction)
_LOCKED_TRIES = 8
_LOCKED_FIRST_PAUSE_S = 0.1


def _is_locked(exc: BaseException) -> bool:
    """SQLite's transient 'database is locked', raw or wrapped by SQLAlchemy / MLflow."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if "database is locked" in str(current):
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


def _retry_locked(fn, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; while SQLite answers 'database is locked', wait (doubling, with jitter) and try again.

    SQLite lets one process write at a time and gives up after its own busy
    timeout; several processes logging to one store meet that under load.
    A bounded number of tries, then the error is raised as it came.
    """
    import random

    pause = _LOCKED_FIRST_PAUSE_S
    for attempt in range(1, _LOCKED_TRIES + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == _LOCKED_TRIES or not _is_locked(exc):
                raise
        time.sleep(pause * (0.5 + random.random()))  # jitter: writers that collided do not collide again
        pause = min(pause * 2, 4.0)
    raise AssertionError("unreachable")


def client_for(uri: str | None = None):
    """An ``MlflowClient`` for ``uri`` (resolved like every run's URI)."""
    uri = resolve_uri(uri)
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise MissingExtra("mlflow", "mlflow") from exc
    ensure_store(uri)  # every run, preflight and client comes through here: the store exists before first use
    return MlflowClient(tracking_uri=uri)


def preflight(uri: str | None = None, experiment: str | None = None, timeout: float = 5.0) -> str:
    """Check that the tracking store answers; returns the resolved URI.

    Raises ConfigError (CLI exit 2) naming the URI. Call it before hours of
    work when a command chains several tracked stages.
    """
    uri = resolve_uri(uri)
    if experiment is not None:
        check_experiment_name(experiment)
    check_server(uri, timeout)
    if uri.startswith(("http://", "https://")):
        return uri  # check_server made one real API call; MLflow's client would retry a bad server for minutes
    try:
        client = client_for(uri)  # creates a fresh SQLite store (once, under its lock)
        if experiment:
            client.get_experiment_by_name(experiment)
        else:
            client.search_experiments(max_results=1)
    except (ConfigError, MissingExtra):
        raise
    except Exception as exc:  # noqa: BLE001 - any store failure is a bad URI from the user's side
        raise ConfigError(f"tracking URI {uri!r} cannot be used: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return uri


def check_tracking(cfg) -> str | None:
    """``preflight`` for a config: the resolved URI, or None when this process will not log.

    Commands that do long work before their first tracked run (memorization
    scores, a retrain reference, a sweep) call this first, so an unreachable
    server stops them at once (ConfigError, exit 2) instead of hours later.
    """
    if not cfg.tracking.enabled or not is_rank_zero():
        return None
    return preflight(cfg.tracking.uri, cfg.tracking.experiment)


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live next to the database, not in the cwd's ./mlruns."""
    db = sqlite_path(uri)
    if db is None:
        return None  # a server decides (its --artifacts-destination / --default-artifact-root)
    check_experiment_name(experiment)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).strip("_") or "experiment"
    root = db.resolve().parent / "mlartifacts"
    location = (root / safe).resolve()
    if location.parent != root.resolve():  # belt and braces: artifacts never leave the store
        raise ConfigError(f"tracking.experiment={experiment!r} would put artifacts outside {str(root)!r}; "
                          "expected a plain name such as 'sharp-unlearn'")
    return location.as_uri()


def get_or_create_experiment(client, name: str, uri: str) -> str:
    experiment = _retry_locked(client.get_experiment_by_name, name)
    if experiment is None:
        try:
            return _retry_locked(client.create_experiment, name, artifact_location=_artifact_location(uri, name))
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001 - another process created it first (RESOURCE_ALREADY_EXISTS)
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError(f"MLflow experiment {name!r} is deleted; restore it "
                          f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) "
                          "or choose another name with tracking.experiment=NAME")
    return experiment.experiment_id


# --------------------------------------------------------------------------- trackers
class NullTracker:
    """Same interface as MlflowTracker, records nothing (tracking off, or rank > 0)."""

    run_id: str | None = None
    uri: str | None = None
    experiment_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def log_dict(self, data: Mapping[str, Any], name: str) -> None: ...
    def log_table(self, table: Any, name: str, artifact_path: str | None = "tables") -> None: ...
    def log_indices(self, indices: Sequence[int] | Any, name: str = "forget_indices.parquet",
                    artifact_path: str | None = "forget_set", **columns: Any) -> None: ...
    def log_figure(self, figure: Any, name: str, artifact_path: str | None = "figures") -> None: ...
    def log_preview_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str,
                          csv: bool = True) -> None: ...
    def log_checkpoint(self, path: str | os.PathLike, artifact_path: str | None = "checkpoint") -> bool:
        return False


class MlflowTracker(NullTracker):
    """Logs to one MLflow run through an ``MlflowClient`` (no global fluent state).

    Per-epoch metrics carry ``step``; final metrics (``step=None``) are logged
    at the last step seen and a later timestamp, so ``run.data.metrics`` (MLflow's
    "latest" value: highest step, then newest timestamp) holds the final value.
    """

    def __init__(self, client, run_id: str, max_artifact_mb: float = 200.0, uri: str | None = None,
                 experiment_id: str | None = None):
        self.client = client
        self.run_id = run_id
        self.max_artifact_mb = max_artifact_mb
        self.uri = uri
        self.experiment_id = experiment_id
        self._last_step = 0
        self._last_timestamp = 0

    @staticmethod
    def _call(method, *args: Any, **kwargs: Any) -> Any:
        """A client call, retried while SQLite is busy with another process's write."""
        return _retry_locked(method, *args, **kwargs)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            self._call(self.client.log_batch, self.run_id, params=items[start:start + _PARAMS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), _tag_value(v)) for k, v in tags.items() if v is not None]
        if items:
            self._call(self.client.log_batch, self.run_id, tags=items)

    def _timestamp(self) -> int:
        # strictly increasing: a final value logged in the same millisecond as the
        # last epoch's must still win MLflow's (step, timestamp, value) ordering
        now = max(int(time.time() * 1000), self._last_timestamp + 1)
        self._last_timestamp = now
        return now

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        if step is None:
            step = self._last_step
        else:
            step = int(step)
            self._last_step = max(self._last_step, step)
        now = self._timestamp()
        items = []
        for key, value in metrics.items():
            if value is None:
                continue
            value = float(value)
            if value != value:  # NaN: a metric that could not be computed is left out, not logged as NaN
                continue
            items.append(Metric(str(key), value, now, step))
        for start in range(0, len(items), _METRICS_PER_BATCH):
            self._call(self.client.log_batch, self.run_id, metrics=items[start:start + _METRICS_PER_BATCH])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {str(path)!r} does not exist")
        if path.is_file() and path.stat().st_size > self.max_artifact_mb * 2**20:
            self._log_reference(path, artifact_path)
            return
        if path.is_dir():
            self._call(self.client.log_artifacts, self.run_id, str(path), artifact_path)
        else:
            self._call(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def _log_reference(self, path: Path, artifact_path: str | None) -> None:
        """A file too large to copy (a big checkpoint) is recorded by path and size."""
        reference = {"path": str(path.resolve()), "bytes": path.stat().st_size,
                     "host": os.uname().nodename if hasattr(os, "uname") else ""}
        self.set_tags({f"artifact_ref.{path.name}": reference["path"]})
        name = f"{artifact_path}/{path.name}.ref.json" if artifact_path else f"{path.name}.ref.json"
        self._call(self.client.log_text, self.run_id, json.dumps(reference, indent=2), name)

    def log_checkpoint(self, path: str | os.PathLike, artifact_path: str | None = "checkpoint") -> bool:
        """Copy a checkpoint into the run, or record a reference when it exceeds max_artifact_mb.

        Returns True when the file itself was copied.
        """
        path = Path(path)
        copied = path.stat().st_size <= self.max_artifact_mb * 2**20
        self.log_artifact(path, artifact_path)
        return copied

    def log_text(self, text: str, name: str) -> None:
        self._call(self.client.log_text, self.run_id, text, name)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        if name.endswith((".yaml", ".yml")):
            import yaml

            self.log_text(yaml.safe_dump(_plain(data), sort_keys=False), name)
        else:
            self.log_text(json.dumps(_plain(data), indent=2, default=str), name)

    def log_table(self, table: Any, name: str, artifact_path: str | None = "tables") -> None:
        """Log a table as Parquet: a pyarrow Table, a list of row dicts, or a dict of columns."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if isinstance(table, pa.Table):
            arrow = table
        elif isinstance(table, Mapping):
            arrow = pa.table(dict(table))
        else:
            arrow = pa.Table.from_pylist(list(table))
        if not name.endswith(".parquet"):
            name += ".parquet"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            pq.write_table(arrow, path)
            self._call(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_indices(self, indices: Sequence[int] | Any, name: str = "forget_indices.parquet",
                    artifact_path: str | None = "forget_set", **columns: Any) -> None:
        """Log example indices (e.g. the forget set) as Parquet: column ``index`` plus any ``columns``."""
        import numpy as np

        data = {"index": np.asarray(indices, dtype=np.int64).reshape(-1)}
        for key, values in columns.items():
            data[key] = np.asarray(values).reshape(-1)
            if len(data[key]) != len(data["index"]):
                raise ValueError(f"column {key!r} has {len(data[key])} values for {len(data['index'])} indices")
        self.log_table(data, name, artifact_path)

    def log_figure(self, figure: Any, name: str, artifact_path: str | None = "figures") -> None:
        """Log a matplotlib figure as PNG."""
        if not name.endswith(".png"):
            name += ".png"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            figure.savefig(path, format="png", dpi=110, bbox_inches="tight")
            self._call(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_preview_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str, csv: bool = True) -> None:
        """Log rows as a table the MLflow UI previews: MLflow's table JSON (as ``mlflow.log_table``
        writes it, listed in the run's ``mlflow.loggedArtifacts`` tag) plus the same rows as CSV.

        ``artifact_file`` ends with ``.json``; the CSV goes next to it. Parquet stays the format
        for programs; this is for people looking at a run.
        """
        import pandas as pd

        frame = pd.DataFrame([{str(k): _plain(v) for k, v in row.items()} for row in rows])
        if not artifact_file.endswith(".json"):
            artifact_file += ".json"
        self._call(self.client.log_table, self.run_id, frame, artifact_file)
        if csv:
            folder, _, stem = artifact_file.rpartition("/")
            self.log_text(frame.to_csv(index=False), (f"{folder}/" if folder else "") + stem[:-5] + ".csv")


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[:_MAX_PARAM_CHARS - 3] + "..."


def _tag_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_TAG_CHARS else text[:_MAX_TAG_CHARS - 3] + "..."


def _plain(value: Any) -> Any:
    """Tuples -> lists, numpy scalars -> Python, for YAML/JSON dumps."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (TypeError, ValueError):
            return str(value)
    return value


# --------------------------------------------------------------------------- runs
#: the run new runs nest under when they name no parent themselves (see :func:`children_of`)
_DEFAULT_PARENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("sharp_unlearn_parent_run",
                                                                             default=None)


@contextlib.contextmanager
def children_of(run_id: str | None) -> Iterator[None]:
    """Every run opened inside the block (in this process) becomes a child of ``run_id``.

    The demo and ``reproduce`` open one parent run and call recipes that open their
    own runs several calls deep; this nests them without threading an argument
    through every recipe. ``None`` (tracking off) changes nothing.
    """
    token = _DEFAULT_PARENT.set(run_id or _DEFAULT_PARENT.get())
    try:
        yield
    finally:
        _DEFAULT_PARENT.reset(token)


class RunTerminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives inside a tracked run (the run ends KILLED).

    A KeyboardInterrupt subclass so that code catching ``Exception`` does not
    swallow it and the CLI treats it as an interruption.
    """


def _on_sigterm(signum, frame):
    note_termination()
    raise RunTerminated("SIGTERM")


def standard_tags(kind: str) -> dict[str, Any]:
    """Tags every run carries, plus MLflow's own source tags so the UI shows them."""
    commit = git_commit()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {"kind": kind, "git_commit": commit, "mlflow.source.git.commit": commit,
            "mlflow.source.type": "LOCAL", "mlflow.source.name": Path(sys.argv[0]).name or "python",
            "mlflow.user": user}


@contextlib.contextmanager
def tracked_run(*, uri: str | None, experiment: str, kind: str, tags: Mapping[str, Any] | None = None,
                params: Mapping[str, Any] | None = None, run_name: str | None = None,
                parent_run_id: str | None = None, config_yaml: str | None = None,
                max_artifact_mb: float = 200.0, enabled: bool = True) -> Iterator[NullTracker]:
    """Open an MLflow run without an ExperimentConfig (``compare`` uses this; ``open_run`` builds on it)."""
    if not enabled or not is_rank_zero():
        yield NullTracker()
        return
    uri = preflight(uri, experiment)
    client = client_for(uri)
    experiment_id = get_or_create_experiment(client, experiment, uri)
    all_tags = standard_tags(kind)
    parent_run_id = parent_run_id or _DEFAULT_PARENT.get()
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags.update({k: v for k, v in (tags or {}).items() if v is not None})
    run = _retry_locked(client.create_run, experiment_id, run_name=run_name or kind,
                        tags={k: _tag_value(v) for k, v in all_tags.items()})
    run_id = run.info.run_id
    tracker = MlflowTracker(client, run_id, max_artifact_mb, uri=uri, experiment_id=experiment_id)
    status = "FAILED"
    with handle_sigterm(_on_sigterm):
        try:
            if params:
                tracker.log_params(params)
            if config_yaml is not None:
                tracker.log_text(config_yaml, "config.yaml")
            yield tracker
            status = "FINISHED"
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (RunTerminated)
            status = "KILLED"
            with contextlib.suppress(Exception):
                how = "SIGTERM" if isinstance(exc, (RunTerminated, Terminated)) else "KeyboardInterrupt"
                tracker.set_tags({"interrupted": how})
            raise
        except SystemExit as exc:
            status = "FINISHED" if exc.code in (None, 0) else "FAILED"
            if termination_requested():  # Ray's own SIGTERM handler exits this way
                status = "KILLED"
            if status == "FAILED":
                with contextlib.suppress(Exception):
                    tracker.set_tags({"error": f"SystemExit: {exc.code}"})
            raise
        except BaseException as exc:
            if termination_requested():  # raised while unwinding from SIGTERM / Ctrl-C: an interruption
                status = "KILLED"
            with contextlib.suppress(Exception):
                tracker.set_tags({"error": f"{type(exc).__name__}: {exc}"})
                tracker.log_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                                 "error.txt")
            raise
        finally:
            # a second SIGTERM while the status is written would leave the run RUNNING forever
            # MLflow prints "View run at <url>" on stdout when a server-backed run ends;
            # stdout belongs to --json output, so the link goes to stderr
            with handle_sigterm(signal.SIG_IGN), contextlib.redirect_stdout(sys.stderr):
                with contextlib.suppress(Exception):
                    _retry_locked(client.set_terminated, run_id, status=status)


def _default_tags(cfg, kind: str) -> dict[str, Any]:
    """Contract tags derivable from the config; recipes' explicit tags override them."""
    tags: dict[str, Any] = {"seed": cfg.seed, "dataset": cfg.data.name, "model": cfg.model.name,
                            "optimizer": cfg.optimizer.tag}
    if kind in ("unlearn", "evaluate") and cfg.method is not None:
        tags["method"] = cfg.method.name
    if kind in ("retrain", "mask", "unlearn", "evaluate") and cfg.forget is not None:
        tags["forget_set"] = cfg.forget.label
    return tags


@contextlib.contextmanager
def open_run(cfg, kind: str, tags: Mapping[str, Any] | None = None, run_name: str | None = None,
             parent_run_id: str | None = None, log_config: bool = True) -> Iterator[NullTracker]:
    """Open an MLflow run for one command; yields a tracker (NullTracker when off or rank > 0).

    Logs the resolved config as dotted params and as ``config.yaml``, and the
    contract tags (kind, dataset, model, optimizer, seed, git_commit; method and
    forget_set for unlearning kinds). ``tags`` add or override them: recipes pass
    ``split_hash``, ``pretrain_run_id``, ``reference_run_id``, the Sharp MinMax
    optimizer pair... ``parent_run_id`` nests the run (sweep trials).
    """
    tracking = cfg.tracking
    all_tags = _default_tags(cfg, kind)
    all_tags.update({k: v for k, v in (tags or {}).items() if v is not None})
    with tracked_run(uri=tracking.uri, experiment=tracking.experiment, kind=kind, tags=all_tags,
                     params=cfg.flat() if log_config else None, run_name=run_name,
                     parent_run_id=parent_run_id, config_yaml=cfg.to_yaml() if log_config else None,
                     max_artifact_mb=tracking.max_artifact_mb, enabled=tracking.enabled) as tracker:
        yield tracker


# --------------------------------------------------------------------------- reading back
LINEAGE_TAGS = ("pretrain_run_id", "reference_run_id")


def lineage(client, run_id: str, max_depth: int = 8) -> list[tuple[str, Any]]:
    """Walk ``pretrain_run_id`` / ``reference_run_id`` / parent tags from a run.

    Returns ``[(role, run), ...]`` starting with ``("self", run)``; roles are
    the tag names that led to each run (``pretrain_run_id``, ``reference_run_id``,
    ``mlflow.parentRunId``). Runs already visited are not repeated.
    """
    seen: set[str] = set()
    chain: list[tuple[str, Any]] = []
    queue: list[tuple[str, str, int]] = [("self", run_id, 0)]
    while queue:
        role, current, depth = queue.pop(0)
        if current in seen or depth > max_depth:
            continue
        seen.add(current)
        try:
            run = client.get_run(current)
        except Exception:  # noqa: BLE001 - a deleted or foreign run ends that branch
            continue
        chain.append((role, run))
        for tag in (*LINEAGE_TAGS, "mlflow.parentRunId"):
            target = run.data.tags.get(tag)
            if target and target not in seen:
                queue.append((tag, target, depth + 1))
    return chain
