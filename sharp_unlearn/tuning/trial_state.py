"""What every sweep trial shares, sharded or not: its inputs, the session outside Ray, the ledger,
the per-epoch reporter, the lock of the model cache and the driver's pretrained model.

The lowest layer of the trial code: ``trainables`` (single-device trials, Ray's
session) and ``sharded`` (DeepSpeed ZeRO trials) both build on it, and it
imports neither.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from sharp_unlearn.config import config_from_dict, merge
from sharp_unlearn.files import atomic_write
from sharp_unlearn.methods import METHODS
from sharp_unlearn.optim.factory import sam_spec
from sharp_unlearn.recipes.unlearn import load_pretrained
from sharp_unlearn.tuning.spec import Dimension, Objective, resolve_trial_trees


@dataclass
class TrialInputs:
    """Everything every trial shares; shipped once through Ray's object store."""

    stage: str
    dims: list[Dimension]
    objective: Objective
    pretrain_tree: dict[str, Any] | None
    unlearn_tree: dict[str, Any] | None
    unlearn_overrides: dict[str, Any]
    output_dir: str
    threads: int = 1
    ledger_dir: str | None = None
    #: stage unlearn, computed once by the driver: the pretrained checkpoint's bytes (trials need no
    #: shared file system for it), the forget split, the reference's and the original model's metrics
    pretrained_bytes: bytes | None = None
    split: Any = None
    reference: dict[str, Any] | None = None
    original: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dims]


def trial_configs(inputs: TrialInputs, params: dict[str, Any]):
    """The trial's (pretraining, unlearning) ExperimentConfigs, with the settings every trial needs.

    Trials do not log to MLflow themselves (the driver logs each trial as a
    child run from its reports), checkpoint and evaluate every epoch.
    """
    pre, un = resolve_trial_trees(inputs.stage, inputs.dims, params, inputs.pretrain_tree, inputs.unlearn_tree,
                                  inputs.unlearn_overrides)
    trial_settings = {"tracking": {"enabled": False}, "train": {"checkpoint_every": 1, "eval_every": 1}}
    pre_cfg = config_from_dict(merge(pre, trial_settings)) if pre is not None else None
    un_cfg = config_from_dict(merge(un, trial_settings)) if un is not None else None
    return pre_cfg, un_cfg


# --------------------------------------------------------------------------- sessions
class LocalSession:
    """A session outside Ray: keeps reports in memory, never restores."""

    def __init__(self, trial_id: str = "local"):
        self.trial_id = trial_id
        self.reports: list[dict[str, float]] = []

    def restore(self, dest: Path) -> bool:
        return False

    def report(self, metrics: dict[str, float], checkpoint_file: Path | None = None) -> None:
        self.reports.append(dict(metrics))


# --------------------------------------------------------------------------- bookkeeping
class Ledger:
    """One JSON line per trial event, appended (each trial writes its own file)."""

    def __init__(self, directory: str | None, trial_id: str):
        self.path = Path(directory) / f"{trial_id}.jsonl" if directory else None
        self.trial_id = trial_id

    def write(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        line = json.dumps({"event": event, "trial_id": self.trial_id, "pid": os.getpid(),
                           "time": time.time(), **fields})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(line + "\n")
        except OSError:  # a worker without the driver's file system (remote node): the ledger is optional
            self.path = None


@contextlib.contextmanager
def cache_lock(inputs: TrialInputs, stage_dir: Path) -> Iterator[None]:
    """Serialise trials that would train the same cached model (same pretraining or reference config).

    The project's one inter-process lock (``filelock``, as the pretraining cache and the tracking store use).
    """
    # under the sweep's output_dir, which every trial of the sweep shares
    path = Path(inputs.output_dir) / "locks" / f"{stage_dir.parent.name}-{stage_dir.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


def writable_split(split):
    """The forget split with its arrays copied: arrays from Ray's object store are read-only views,
    and the engine wants its own."""
    return dataclasses.replace(split, **{
        f.name: np.array(getattr(split, f.name)) for f in dataclasses.fields(split)
        if isinstance(getattr(split, f.name), np.ndarray)})


# --------------------------------------------------------------------------- reporting
class EpochReporter:
    """Turns the engine's per-epoch records into Tune results with the objective and a checkpoint."""

    def __init__(self, session, objective: Objective, planned_epochs: int, stage_file: Path | None,
                 ledger: Ledger, original: dict[str, float] | None = None):
        self.session = session
        self.objective = objective
        self.planned = planned_epochs
        self.stage_file = stage_file
        self.ledger = ledger
        self.original = original or {}
        self.started = time.perf_counter()
        self.last_epoch = 0
        self.last_record: dict[str, Any] = {}

    def metrics(self, epoch: int, record: dict[str, Any]) -> dict[str, float]:
        out = {k: float(v) for k, v in record.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
        for split in ("test", "retain"):
            if f"{split}_acc" in out and f"{split}_acc" in self.original:
                out[f"{split}_acc_drop"] = self.original[f"{split}_acc"] - out[f"{split}_acc"]
        out.setdefault("wall_seconds", time.perf_counter() - self.started)
        out["epoch"] = int(epoch)
        out["epochs_planned"] = int(self.planned)
        out.update(self.objective.score(out))
        return out

    def epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """The engine's ``on_epoch_end``: report all but the last epoch (that one comes with final metrics)."""
        self.last_epoch = epoch
        self.last_record = dict(record)
        if epoch >= self.planned:
            return
        metrics = self.metrics(epoch, record)
        started = time.perf_counter()
        self.session.report(metrics, self.stage_file)
        # written after report returns: by then Ray has registered this epoch's checkpoint;
        # report_seconds = how long the trial waited on Ray for it (persisting the checkpoint, the driver)
        self.ledger.write("epoch", epoch=epoch, report_seconds=round(time.perf_counter() - started, 4))

    def final(self, record: dict[str, Any], epoch: int | None = None) -> dict[str, float]:
        epoch = max(int(epoch or self.planned), self.last_epoch)
        # the stage's final metrics win; the last epoch's record adds what they lack (train_loss, lr, ...)
        metrics = self.metrics(epoch, {**self.last_record, **record})
        self.session.report(metrics, self.stage_file)
        # after report returns, as for epochs: "done" then means Ray holds the final result and its
        # checkpoint, so a sweep interrupted now resumes this trial from the completed stage (no training)
        self.ledger.write("done", epoch=epoch, objective=metrics["objective"])
        return metrics

    def diverged(self, message: str) -> dict[str, float]:
        metrics = self.metrics(self.planned, {})
        metrics.update(self.objective.score({}))  # the worst objective: never the best trial
        metrics["diverged"] = 1.0
        self.ledger.write("diverged", epoch=self.last_epoch, message=message[:200])
        self.session.report(metrics)
        return metrics


def planned_epochs(cfg) -> int:
    """Epochs the method will run (RUM multiplies by its groups; those are only known after prepare)."""
    try:
        return int(METHODS.get(cfg.method.name)(cfg.method, cfg.optimizer, sam_spec(cfg.optimizer)).epochs)
    except Exception:  # noqa: BLE001 - a method whose epoch count needs prepare(): fall back to the config
        return int(cfg.method.epochs)


# --------------------------------------------------------------------------- shared inputs
_PRETRAINED_CACHE: dict[str, Any] = {}


def shared_pretrained(data: bytes):
    """The driver's pretrained checkpoint, written and loaded once per worker process (actors are reused)."""
    key = hashlib.sha1(data).hexdigest()
    if key not in _PRETRAINED_CACHE:
        directory = Path(tempfile.gettempdir()) / f"sharp-unlearn-{os.getpid()}"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"pretrained-{key[:12]}.pt"
        atomic_write(path, data)
        for old in _PRETRAINED_CACHE.values():  # one sweep per process at a time: drop the previous model
            Path(old.path).unlink(missing_ok=True)
        _PRETRAINED_CACHE.clear()
        _PRETRAINED_CACHE[key] = load_pretrained(path)
    return _PRETRAINED_CACHE[key]
