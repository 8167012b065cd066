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

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sharp_unlearn.engine.checkpoint import load_checkpoint
from sharp_unlearn.engine.runner import resolve_device
from sharp_unlearn.errors import TrainingDiverged
from sharp_unlearn.files import atomic_path
from sharp_unlearn.metrics.accuracy import split_accuracies
from sharp_unlearn.metrics.tow import tow
from sharp_unlearn.recipes.memorization import select_forget_set
from sharp_unlearn.recipes.pretrain import stage_dir, train_from_scratch
from sharp_unlearn.recipes.unlearn import Reference, get_reference, load_pretrained, run_unlearning
from sharp_unlearn.tuning.sharded import SHARDED_TRIALS
from sharp_unlearn.tuning.trial_state import (
    EpochReporter,
    Ledger,
    TrialInputs,
    cache_lock,
    planned_epochs,
    shared_pretrained,
    trial_configs,
    writable_split,
)

#: inside a trial's Tune checkpoint: the stage checkpoint file the engine writes
CHECKPOINT_FILE = "stage.pt"


# --------------------------------------------------------------------------- sessions
class RaySession:
    """Ray Tune's function-trainable session."""

    def __init__(self):
        from ray import tune

        self.tune = tune
        self.trial_id = tune.get_context().get_trial_id() or "trial"

    def restore(self, dest: Path) -> bool:
        """Copy the last reported stage checkpoint to ``dest``; False when the trial starts fresh."""
        checkpoint = self.tune.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as directory:
            source = Path(directory) / CHECKPOINT_FILE
            if not source.is_file():
                return False
            with atomic_path(dest) as tmp:
                shutil.copyfile(source, tmp)
        return True

    def report(self, metrics: dict[str, float], checkpoint_file: Path | None = None) -> None:
        if checkpoint_file is None or not Path(checkpoint_file).is_file():
            self.tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="sharp-unlearn-ckpt-") as directory:
            target = Path(directory) / CHECKPOINT_FILE
            try:  # the engine replaces its file atomically, so a hard link is a stable snapshot: no copy
                os.link(checkpoint_file, target)
            except OSError:
                shutil.copyfile(checkpoint_file, target)
            # Ray persists the directory to the sweep's storage before report returns
            self.tune.report(metrics, checkpoint=self.tune.Checkpoint.from_directory(directory))


# --------------------------------------------------------------------------- the trials
def _unlearn_and_report(cfg, pretrained, split, reference, original, inputs: TrialInputs, session,
                        workdir: Path) -> dict[str, float]:
    ledger = Ledger(inputs.ledger_dir, session.trial_id)
    stage_file = workdir / CHECKPOINT_FILE
    restored = session.restore(stage_file)
    state = load_checkpoint(stage_file) if restored else {}
    ledger.write("start", start_epoch=int(state.get("epoch", 0)), stage="unlearn")
    reporter = EpochReporter(session, inputs.objective, planned_epochs(cfg), stage_file, ledger, original)
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
    _, cfg = trial_configs(inputs, params)
    pretrained = shared_pretrained(inputs.pretrained_bytes)
    ref = inputs.reference
    reference = Reference(Path(ref["checkpoint"]), dict(ref["metrics"]), ref.get("run_id"),
                          float(ref.get("wall_seconds", 0.0)), cached=True)
    with tempfile.TemporaryDirectory(prefix="sharp-unlearn-trial-") as workdir:
        return _unlearn_and_report(cfg, pretrained, writable_split(inputs.split), reference, inputs.original,
                                   inputs, session, Path(workdir))


def pretrain_trial(inputs: TrialInputs, params: dict[str, Any], session) -> dict[str, float]:
    """Stage ``pretrain``: train into the shared pretraining cache, so later sweeps can reuse the models."""
    cfg, _ = trial_configs(inputs, params)
    ledger = Ledger(inputs.ledger_dir, session.trial_id)
    directory = stage_dir(cfg, "pretrain")
    ckpt = directory / "checkpoint.pt"
    with cache_lock(inputs, directory):
        with tempfile.TemporaryDirectory(prefix="sharp-unlearn-trial-") as workdir:
            restored_file = Path(workdir) / CHECKPOINT_FILE
            if session.restore(restored_file):
                restored_epoch = int(load_checkpoint(restored_file).get("epoch", 0))
                local_epoch = int(load_checkpoint(ckpt).get("epoch", -1)) if ckpt.is_file() else -1
                if restored_epoch > local_epoch:  # another node, or a cleaned cache: continue from the trial's own
                    with atomic_path(ckpt) as tmp:  # a crash mid-copy must not leave a torn cache checkpoint
                        shutil.copyfile(restored_file, tmp)
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

    pre_cfg, cfg = trial_configs(inputs, params)
    with cache_lock(inputs, stage_dir(pre_cfg, "pretrain")):
        outcome = train_from_scratch(pre_cfg, quiet=True)
    pretrained = load_pretrained(outcome.checkpoint)
    device = resolve_device(cfg.device)
    model = pretrained.model(device)
    split = select_forget_set(cfg.forget, pretrained.bundle, pretrained.cfg.seed, model=model, device=device,
                              run_cfg=pretrained.cfg)
    ref_cfg = copy.deepcopy(pretrained.cfg)
    with cache_lock(inputs, stage_dir(ref_cfg, "retrain", split.split_hash)):
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
        return SHARDED_TRIALS[inputs.stage](inputs, params, session)
    return TRIALS[inputs.stage](inputs, params, session)


def tune_trainable(config: dict[str, Any], inputs: TrialInputs) -> None:
    """The function Ray Tune runs for each trial (``tune.with_parameters`` passes ``inputs``)."""
    run_trial(inputs, {key: config[key] for key in inputs.keys if key in config}, RaySession())
