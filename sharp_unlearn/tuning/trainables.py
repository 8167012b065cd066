"""What one sweep trial runs: pretraining, unlearning, or both chained, reporting every epoch.

A trial is a plain function of (shared inputs, sampled params, session). The
session is Ray Tune's (``tune.report`` / ``tune.get_checkpoint``) inside a
sweep, or a local stand-in for benchmarks and tests, so the work a trial does
is the same in and out of Ray.

Per epoch a trial reports the stage's metrics (for unlearning: retain,
forget, val, test accuracy and ToW against the shared reference) plus
``objective`` (the sweep's objective after constraints), ``epoch`` (ASHA's
time axis) and a checkpoint: the stage checkpoint file (model, optimizer,
scheduler, epoch) written by the engine. A retried trial copies it back and
the engine resumes from that epoch. The last epoch is reported once the
stage has finished, with the stage's final metrics.

Trials append one JSON line per event (``start`` with ``start_epoch``,
``epoch``, ``done``, ``diverged``) to ``<ledger_dir>/<trial_id>.jsonl``: an
audit of how often and from where each trial trained.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sharp_unlearn.tuning.spec import Dimension, Objective, resolve_trial_trees

CHECKPOINT_FILE = "stage.pt"


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
    from sharp_unlearn.config import config_from_dict, merge

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


class RaySession:
    """Ray Tune's function-trainable session."""

    def __init__(self):
        from ray import tune

        self._tune = tune
        self.trial_id = tune.get_context().get_trial_id() or "trial"

    def restore(self, dest: Path) -> bool:
        """Copy the last reported stage checkpoint to ``dest``; False when the trial starts fresh."""
        checkpoint = self._tune.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as directory:
            source = Path(directory) / CHECKPOINT_FILE
            if not source.is_file():
                return False
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.restore")
            shutil.copyfile(source, tmp)
            os.replace(tmp, dest)
        return True

    def report(self, metrics: dict[str, float], checkpoint_file: Path | None = None) -> None:
        if checkpoint_file is None or not Path(checkpoint_file).is_file():
            self._tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="sharp-unlearn-ckpt-") as directory:
            target = Path(directory) / CHECKPOINT_FILE
            try:  # the engine replaces its file atomically, so a hard link is a stable snapshot: no copy
                os.link(checkpoint_file, target)
            except OSError:
                shutil.copyfile(checkpoint_file, target)
            # Ray persists the directory to the sweep's storage before report returns
            self._tune.report(metrics, checkpoint=self._tune.Checkpoint.from_directory(directory))


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
def file_lock(path: Path) -> Iterator[None]:
    """Serialise trials that would train the same cached model (same pretraining or reference config)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def _planned_epochs(cfg) -> int:
    """Epochs the method will run (RUM multiplies by its groups; those are only known after prepare)."""
    from sharp_unlearn.methods import METHODS
    from sharp_unlearn.optim.factory import sam_spec

    try:
        return int(METHODS.get(cfg.method.name)(cfg.method, cfg.optimizer, sam_spec(cfg.optimizer)).epochs)
    except Exception:  # noqa: BLE001 - a method whose epoch count needs prepare(): fall back to the config
        return int(cfg.method.epochs)


# --------------------------------------------------------------------------- the trials
_PRETRAINED_CACHE: dict[str, Any] = {}


def _shared_pretrained(data: bytes):
    """The driver's pretrained checkpoint, written and loaded once per worker process (actors are reused)."""
    from sharp_unlearn.recipes.unlearn import load_pretrained

    key = hashlib.sha1(data).hexdigest()
    if key not in _PRETRAINED_CACHE:
        directory = Path(tempfile.gettempdir()) / f"sharp-unlearn-{os.getpid()}"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"pretrained-{key[:12]}.pt"
        path.write_bytes(data)
        for old in _PRETRAINED_CACHE.values():  # one sweep per process at a time: drop the previous model
            Path(old.path).unlink(missing_ok=True)
        _PRETRAINED_CACHE.clear()
        _PRETRAINED_CACHE[key] = load_pretrained(path)
    return _PRETRAINED_CACHE[key]


def _unlearn_and_report(cfg, pretrained, split, reference, original, inputs: TrialInputs, session,
                        workdir: Path) -> dict[str, float]:
    from sharp_unlearn.engine.checkpoint import load_checkpoint
    from sharp_unlearn.errors import TrainingDiverged
    from sharp_unlearn.recipes.unlearn import run_unlearning

    ledger = Ledger(inputs.ledger_dir, session.trial_id)
    stage_file = workdir / CHECKPOINT_FILE
    restored = session.restore(stage_file)
    state = load_checkpoint(stage_file) if restored else {}
    ledger.write("start", start_epoch=int(state.get("epoch", 0)), stage="unlearn")
    reporter = EpochReporter(session, inputs.objective, _planned_epochs(cfg), stage_file, ledger, original)
    if state.get("completed"):  # the stage had finished when the trial died: report its last epoch again
        return reporter.final(dict(state["history"][-1]) if state.get("history") else {}, int(state["epoch"]))
    try:
        outcome = run_unlearning(cfg, pretrained.path, pretrained=pretrained, split=split, reference=reference,
                                 epoch_callback=reporter.epoch, stage_checkpoint=stage_file, quiet=True,
                                 save_model=False)
    except TrainingDiverged as exc:  # deterministic: retrying would diverge again
        return reporter.diverged(str(exc))
    return reporter.final(outcome.metrics)


def unlearn_trial(inputs: TrialInputs, params: dict[str, Any], session) -> dict[str, float]:
    """Stage ``unlearn``: the pretrained model, split and reference come from the driver."""
    from sharp_unlearn.recipes.unlearn import Reference

    _, cfg = trial_configs(inputs, params)
    pretrained = _shared_pretrained(inputs.pretrained_bytes)
    ref = inputs.reference
    reference = Reference(Path(ref["checkpoint"]), dict(ref["metrics"]), ref.get("run_id"),
                          float(ref.get("wall_seconds", 0.0)), cached=True)
    # arrays from Ray's object store are read-only views; the engine wants its own
    split = dataclasses.replace(inputs.split, **{
        f.name: np.array(getattr(inputs.split, f.name)) for f in dataclasses.fields(inputs.split)
        if isinstance(getattr(inputs.split, f.name), np.ndarray)})
    with tempfile.TemporaryDirectory(prefix="sharp-unlearn-trial-") as workdir:
        return _unlearn_and_report(cfg, pretrained, split, reference, inputs.original, inputs, session,
                                   Path(workdir))


def _lock_path(inputs: TrialInputs, stage_dir: Path) -> Path:
    return Path(inputs.output_dir) / "locks" / f"{stage_dir.parent.name}-{stage_dir.name}.lock"


def pretrain_trial(inputs: TrialInputs, params: dict[str, Any], session) -> dict[str, float]:
    """Stage ``pretrain``: train into the shared pretraining cache, so later sweeps can reuse the models."""
    from sharp_unlearn.engine.checkpoint import load_checkpoint
    from sharp_unlearn.recipes.pretrain import stage_dir, train_from_scratch

    cfg, _ = trial_configs(inputs, params)
    ledger = Ledger(inputs.ledger_dir, session.trial_id)
    directory = stage_dir(cfg, "pretrain")
    ckpt = directory / "checkpoint.pt"
    with file_lock(_lock_path(inputs, directory)):
        with tempfile.TemporaryDirectory(prefix="sharp-unlearn-trial-") as workdir:
            restored_file = Path(workdir) / CHECKPOINT_FILE
            if session.restore(restored_file):
                restored_epoch = int(load_checkpoint(restored_file).get("epoch", 0))
                local_epoch = int(load_checkpoint(ckpt).get("epoch", -1)) if ckpt.is_file() else -1
                if restored_epoch > local_epoch:  # another node, or a cleaned cache: continue from the trial's own
                    directory.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(restored_file, ckpt)
        state = load_checkpoint(ckpt) if ckpt.is_file() else {}
        ledger.write("start", start_epoch=int(state.get("epoch", 0)), stage="pretrain",
                     cached=bool(state.get("completed")))
        reporter = EpochReporter(session, inputs.objective, cfg.train.epochs, ckpt, ledger)
        outcome = train_from_scratch(cfg, quiet=True, epoch_callback=reporter.epoch)
        return reporter.final(outcome.metrics)


def both_trial(inputs: TrialInputs, params: dict[str, Any], session) -> dict[str, float]:
    """Stage ``both``: pretrain (cached by config), then its reference (cached by split), then unlearn.

    Trials that share a pretraining config share its model and reference
    through the cache; a file lock makes the second one wait for the first
    instead of training the same model twice. Only unlearning epochs are
    reported (they carry the objective).
    """
    import copy

    from sharp_unlearn.engine.runner import resolve_device
    from sharp_unlearn.metrics.accuracy import split_accuracies
    from sharp_unlearn.metrics.tow import tow
    from sharp_unlearn.recipes.memorization import select_forget_set
    from sharp_unlearn.recipes.pretrain import stage_dir, train_from_scratch
    from sharp_unlearn.recipes.unlearn import get_reference, load_pretrained

    pre_cfg, cfg = trial_configs(inputs, params)
    with file_lock(_lock_path(inputs, stage_dir(pre_cfg, "pretrain"))):
        outcome = train_from_scratch(pre_cfg, quiet=True)
    pretrained = load_pretrained(outcome.checkpoint)
    device = resolve_device(cfg.device)
    model = pretrained.model(device)
    split = select_forget_set(cfg.forget, pretrained.bundle, pretrained.cfg.seed, model=model, device=device,
                              run_cfg=pretrained.cfg)
    ref_cfg = copy.deepcopy(pretrained.cfg)
    with file_lock(_lock_path(inputs, stage_dir(ref_cfg, "retrain", split.split_hash))):
        reference = get_reference(pretrained, split, quiet=True, run_cfg=cfg)
    original = split_accuracies(model, pretrained.bundle, split.forget_positions, split.retain_positions, device,
                                cfg.data.eval_batch_size)
    original["tow"] = tow(original, reference.metrics)
    with tempfile.TemporaryDirectory(prefix="sharp-unlearn-trial-") as workdir:
        return _unlearn_and_report(cfg, pretrained, split, reference, original, inputs, session, Path(workdir))


TRIALS = {"pretrain": pretrain_trial, "unlearn": unlearn_trial, "both": both_trial}


def run_trial(inputs: TrialInputs, params: dict[str, Any], session) -> dict[str, float]:
    import torch

    torch.set_num_threads(inputs.threads)  # a trial gets its CPU share, not every core of the node
    if inputs.extra.get("sharded"):  # a DeepSpeed ZeRO job per trial: tuning/sharded.py
        from sharp_unlearn.tuning.sharded import SHARDED_TRIALS

        return SHARDED_TRIALS[inputs.stage](inputs, params, session)
    return TRIALS[inputs.stage](inputs, params, session)


def tune_trainable(config: dict[str, Any], inputs: TrialInputs) -> None:
    """The function Ray Tune runs for each trial (``tune.with_parameters`` passes ``inputs``)."""
    run_trial(inputs, {key: config[key] for key in inputs.keys if key in config}, RaySession())
