"""Checkpoints as MLflow models: log them, register them, and read them back as checkpoint files.

A trained model is logged as an MLflow PyTorch model (``mlflow.pytorch.log_model``,
artifact name ``model``) with a signature inferred from an input example, the
resolved config in the model's metadata and the project's own checkpoint file
as an extra file. That file is what comes back: :func:`resolve_checkpoint` turns
``runs:/<run id>/model`` or ``models:/<name>/<version>`` into a local
``checkpoint.pt``, which is then loaded like any checkpoint (``weights_only=True``),
so nothing pickled by a model flavour is ever unpickled here.

mlflow is imported lazily (extra ``mlflow``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sharp_unlearn.errors import ConfigError, MissingExtra
from sharp_unlearn.tracking import _plain, _retry_locked, client_for, resolve_uri, sqlite_path

MODEL_NAME = "model"
#: where the project's checkpoint sits inside a logged model (mlflow's ``extra_files`` folder)
CHECKPOINT_IN_MODEL = ("extra_files", "checkpoint.pt")
#: run tag holding the logged model's own URI (``models:/m-...``)
MODEL_URI_TAG = "logged_model_uri"
#: run tags copied onto a registered model version: where the model came from
LINEAGE_TAGS = ("method", "optimizer", "forget_set", "pretrain_run_id", "reference_run_id", "pretrain_optimizer",
                "split_hash", "dataset", "model", "seed", "kind")
URI_PREFIXES = ("runs:/", "models:/")


def is_model_uri(ref: str | os.PathLike) -> bool:
    return str(ref).startswith(URI_PREFIXES)


@contextlib.contextmanager
def _store(uri: str) -> Iterator[Any]:
    """MLflow's fluent API and URI resolution read process-wide URIs: point both at ``uri`` for the block."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    # the setters change module globals (which win over the environment for the rest of the process)
    # and the environment: both are put back exactly, or a later MlflowClient() would use this store
    saved_globals = (tracking_state._tracking_uri, registry_state._registry_uri)
    saved_env = {name: os.environ.get(name) for name in
                 ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is for one-line errors
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(saved_globals[0])  # also resets MLflow's tracer state
        registry_state._registry_uri = saved_globals[1]
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def log_model(tracker, model, checkpoint_path: str | os.PathLike, cfg, dataset) -> str | None:
    """Log ``model`` as an MLflow PyTorch model on the tracker's run; returns its ``models:/`` URI.

    The signature is inferred from the first two inputs of ``dataset`` (items ``(x, y, ...)``).
    Logging a model is a convenience on top of the checkpoint file: a failure
    (an architecture ``torch.export`` cannot trace, a store without a model
    registry) is reported on stderr and in the ``model_logging_error`` tag, and the
    run goes on. Off with ``tracking.log_models=false``.
    """
    if tracker.run_id is None or not getattr(cfg.tracking, "log_models", True):
        return None
    import torch

    try:
        from mlflow.models import infer_signature
    except ImportError as exc:
        raise MissingExtra("mlflow", "mlflow") from exc
    model_was_training = model.training
    model.eval()
    try:
        example = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(min(2, len(dataset)))]).cpu()
        device = next(model.parameters()).device
        with torch.no_grad():
            output = model(example.to(device)).cpu().numpy()
        signature = infer_signature(example.numpy(), output)
        metadata = {"sharp_unlearn": {"config": _plain(cfg.to_dict()), "checkpoint": "/".join(CHECKPOINT_IN_MODEL)}}
        cpu_model = model.to("cpu")
        # end_run prints "View run at <url>" on stdout for a server store: stdout belongs to --json
        with _store(tracker.uri) as mlflow, contextlib.redirect_stdout(sys.stderr):
            import mlflow.pytorch

            mlflow.start_run(run_id=tracker.run_id, nested=mlflow.active_run() is not None)
            try:
                info = _log_pytorch(mlflow, cpu_model, signature, example.numpy(), checkpoint_path, metadata)
            finally:
                mlflow.end_run()
                # end_run marks the run FINISHED; it is still open: the tracked run sets the real status at its end
                tracker.client.update_run(tracker.run_id, status="RUNNING")
        model.to(device)
    except Exception as exc:  # noqa: BLE001 - the checkpoint file is the contract; a logged model is extra
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"warning: could not log the model to MLflow ({type(exc).__name__}: {first}); "
              "the checkpoint file is complete", file=sys.stderr)
        with contextlib.suppress(Exception):
            tracker.set_tags({"model_logging_error": f"{type(exc).__name__}: {first}"})
        return None
    finally:
        model.train(model_was_training)
    tracker.set_tags({MODEL_URI_TAG: info.model_uri})
    tracker.log_dict(cfg.to_dict(), "model_config.json")  # the config as a logged dict, next to config.yaml
    return info.model_uri


def _log_pytorch(mlflow, model, signature, example, checkpoint_path, metadata):
    import torch

    common = dict(name=MODEL_NAME, signature=signature, input_example=example,
                  extra_files=[str(checkpoint_path)], metadata=metadata,
                  # pinned requirements: inferring them loads the model in a subprocess (~20 s per model)
                  pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    try:
        return mlflow.pytorch.log_model(model, serialization_format="pt2", **common)  # safe to load: no pickle
    except Exception:  # noqa: BLE001 - torch.export cannot trace every model; pickle still serves the UI
        return mlflow.pytorch.log_model(model, serialization_format="pickle", **common)


def register_model(run_id: str, name: str, tracking_uri: str | None = None,
                   extra_tags: Mapping[str, Any] | None = None) -> int:
    """Register the model logged on ``run_id`` as a new version of ``name``; returns the version number.

    The version carries the run's lineage tags (pretrain_run_id, reference_run_id,
    forget_set, method, ...) and ``run_id``.
    """
    check_model_name(name)
    uri = resolve_uri(tracking_uri)
    client = _client(uri)
    run = client.get_run(run_id)
    model_uri = run.data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        reason = run.data.tags.get("model_logging_error", "tracking.log_models=false or it was never logged")
        raise ConfigError(f"run {run_id} has no logged model to register as {name!r} ({reason})")
    tags = {k: v for k, v in run.data.tags.items() if k in LINEAGE_TAGS}
    tags.update({"run_id": run_id, **{k: str(v) for k, v in (extra_tags or {}).items() if v is not None}})
    # the registry looks the logged model up through the process-wide tracking URI
    with _store(uri):
        try:
            _retry_locked(client.create_registered_model, name, description="registered by sharp-unlearn")
        except Exception as exc:  # noqa: BLE001 - it exists already: add a version to it
            if "RESOURCE_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
                raise
        version = _retry_locked(client.create_model_version, name, model_uri, run_id=run_id, tags=tags,
                                model_id=model_uri.rsplit("/", 1)[-1])
    return int(version.version)


def _client(tracking_uri: str | None):
    """A client whose model registry is the tracking store itself (MLflow's default registry is the
    process-wide URI, or ``./mlflow.db``: a registration would land in another database)."""
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(tracking_uri)
    client_for(uri)  # the store exists (and is migrated once, under its lock) before MLflow opens it
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_model_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or "/" in name or ":" in name:
        raise ConfigError(f"--register {name!r} is not a model name; expected a plain name such as "
                          "'digits-neggrad' (no '/' or ':')")


def resolve_checkpoint(ref: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    """The local checkpoint file behind ``ref``: a path as is, or a logged / registered model.

    ``runs:/<run id>/model`` and ``models:/<name>/<version>`` (also ``models:/<name>@<alias>``
    and ``models:/m-<id>``) are downloaded from the tracking store (``tracking_uri``,
    else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns.db``) into a per-URI folder
    under the system's temporary directory; the checkpoint file the model carries is
    returned. Every command that reads a ``--checkpoint`` goes through here.
    """
    text = str(ref)
    if not is_model_uri(text):
        return Path(ref)
    uri = resolve_uri(tracking_uri)
    hint = ("expected runs:/<run id>/model or models:/<name>/<version> of a model sharp-unlearn logged "
            f"in the tracking store {uri!r} (set --tracking-uri / MLFLOW_TRACKING_URI to the store that has it)")
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # reading a model must not create an empty store
        raise ConfigError(f"checkpoint {text!r}: the tracking store {str(db)!r} does not exist; {hint}")
    client_for(uri)  # the store is migrated once, under its lock, before MLflow opens it
    key = hashlib.sha256(f"{uri}\n{text}".encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / "sharp-unlearn-models" / key
    target.mkdir(parents=True, exist_ok=True)
    try:
        from mlflow.artifacts import download_artifacts
    except ImportError as exc:
        raise MissingExtra("mlflow", "mlflow") from exc
    try:
        with _store(uri), contextlib.redirect_stdout(sys.stderr):
            local = Path(download_artifacts(artifact_uri=text, dst_path=str(target), tracking_uri=uri))
    except Exception as exc:  # noqa: BLE001 - unknown run, model, version or a store without it
        shutil.rmtree(target, ignore_errors=True)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"checkpoint {text!r} cannot be found ({first}); {hint}") from None
    checkpoint = local.joinpath(*CHECKPOINT_IN_MODEL)
    if not checkpoint.is_file():
        raise ConfigError(f"checkpoint {text!r} is an MLflow model without a sharp-unlearn checkpoint "
                          f"({'/'.join(CHECKPOINT_IN_MODEL)} missing); {hint}")
    return checkpoint
