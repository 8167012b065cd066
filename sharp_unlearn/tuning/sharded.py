"""Sweep trials that are DeepSpeed ZeRO jobs (``distributed.backend: deepspeed`` in a sweep file).

A sharded trial is a light process (``SHARDED_DRIVER_CPU``) that starts one Ray
Train run of ``distributed.num_workers`` DeepSpeed workers (Train-inside-Tune:
the Train run gets its own placement group on the sweep's cluster, sized by
the sweep's per-worker ``resources``) and relays the workers' per-epoch
records to Tune with the objective added, so ASHA stops weak sharded trials
like any other.

Relaying: rank 0's ``ray.train.report`` reaches the Train controller, whose
callback (:func:`_relay_callback`) puts the record on a Ray queue; the trial's
own thread takes it, scores it and calls ``tune.report`` with a checkpoint.
The trial thread, not the controller, must call ``tune.report``: only there
can a report carry a checkpoint, and only there does a scheduler's stop end
the trial.

Checkpoints: a record arrives after the workers committed that epoch's
sharded checkpoint (``progress.json`` names it). The trial hard-links the
committed tag into the Tune checkpoint (no copy here; Ray persists it to the
sweep's storage). A retried trial puts it back into the run's sharded folder
when that folder holds nothing newer, and the workers resume from it. The
final report also names the consolidated fp32 export (``export.json``), which
the sweep copies next to ``best_config.yaml`` for the best trial.

Shared inputs: stage ``unlearn`` uses the pretrained model, split and
reference the sweep's driver computed once; stage ``both`` trains them per
pretraining config, sharded, cached by hash and serialised by a file lock,
as unsharded trials do. Files of sharded runs live under ``output_dir``,
which on a multi-node cluster must be a shared file system (every rank
writes its shard there and rank 0 reads them all to consolidate).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sharp_unlearn.config import stable_hash
from sharp_unlearn.data.forget import memorization_groups
from sharp_unlearn.engine.checkpoint import load_checkpoint, load_model_state
from sharp_unlearn.files import atomic_write
from sharp_unlearn.metrics.accuracy import split_accuracies
from sharp_unlearn.metrics.tow import forget_gap, tow
from sharp_unlearn.models import build_model
from sharp_unlearn.recipes.distributed import (
    OUTCOME_FILE,
    build_torch_trainer,
    distributed_config_hash,
    make_spec,
    make_unlearn_spec,
)
from sharp_unlearn.recipes.memorization import select_forget_set
from sharp_unlearn.recipes.unlearn import Reference, load_pretrained
from sharp_unlearn.tuning.trial_state import (
    EpochReporter,
    Ledger,
    LocalSession,
    TrialInputs,
    cache_lock,
    planned_epochs,
    shared_pretrained,
    trial_configs,
    writable_split,
)

#: inside a Tune checkpoint: the committed sharded checkpoint (progress.json + its tag folder)
SHARDED_DIR = "sharded"
#: inside a finished trial's Tune checkpoint: where its consolidated fp32 export is
EXPORT_POINTER = "export.json"
PROGRESS_FILE = "progress.json"
#: how often the trial looks at its Train run while no record is waiting (seconds)
_POLL_S = 0.2


# --------------------------------------------------------------------------- checkpoints
def _link_or_copy(source: str, target: str) -> str:
    try:  # DeepSpeed writes each tag's files once and never rewrites them: a hard link is a stable snapshot
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def _read_progress(sharded_dir: Path) -> dict[str, Any] | None:
    path = Path(sharded_dir) / PROGRESS_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=1, default=float))


def snapshot_sharded(sharded_dir: Path, dest: Path) -> int | None:
    """Hard-link the committed sharded checkpoint of ``sharded_dir`` into ``dest/sharded``; its epoch.

    Rank 0 may commit a newer epoch (and drop the oldest tag) while this runs:
    then the newer one is taken. None when nothing is committed yet.
    """
    target = Path(dest) / SHARDED_DIR
    for _ in range(3):
        progress = _read_progress(sharded_dir)
        if not progress:
            return None
        shutil.rmtree(target, ignore_errors=True)
        try:
            shutil.copytree(Path(sharded_dir) / progress["tag"], target / progress["tag"],
                            copy_function=_link_or_copy)
        except (FileNotFoundError, shutil.Error):
            continue
        _write_json(target / PROGRESS_FILE, progress)
        return int(progress["epoch"])
    return None


def restore_sharded(source: Path, sharded_dir: Path) -> int | None:
    """Put the sharded checkpoint of a Tune checkpoint (``source/sharded``) back into ``sharded_dir``.

    Nothing is copied when ``sharded_dir`` already holds a committed checkpoint
    of the same run at least as far along (the workers resume from the newest).
    Returns the epoch the workers will resume from, or None.
    """
    saved = _read_progress(Path(source) / SHARDED_DIR)
    local = _read_progress(sharded_dir)
    local_ok = bool(local and (Path(sharded_dir) / local["tag"]).is_dir())
    if saved is None:
        return int(local["epoch"]) if local_ok else None
    if (local_ok and local.get("config_hash") == saved.get("config_hash")
            and int(local["epoch"]) >= int(saved["epoch"])):
        return int(local["epoch"])
    sharded_dir = Path(sharded_dir)
    shutil.rmtree(sharded_dir / saved["tag"], ignore_errors=True)
    shutil.copytree(Path(source) / SHARDED_DIR / saved["tag"], sharded_dir / saved["tag"])
    _write_json(sharded_dir / PROGRESS_FILE, saved)
    atomic_write(sharded_dir / "latest", saved["tag"])  # what DeepSpeed's own tools read
    return int(saved["epoch"])


class ShardedSession:
    """A trial session whose checkpoint is a sharded DeepSpeed checkpoint folder, not one file.

    Wraps :class:`~sharp_unlearn.tuning.trainables.RaySession` (inside Tune) or
    :class:`~sharp_unlearn.tuning.trial_state.LocalSession` (benchmarks, tests).
    ``export`` is set once the stage's consolidated fp32 export exists; reports
    after that name it in the checkpoint.
    """

    def __init__(self, session):
        self.session = session
        self.trial_id = session.trial_id
        self.export: Path | None = None
        self.reports = getattr(session, "reports", None)

    @property
    def in_tune(self) -> bool:
        return not isinstance(self.session, LocalSession)

    def restore(self, sharded_dir: Path) -> int | None:
        """The epoch the trial's workers will resume from (Tune's last checkpoint put back if needed)."""
        if not self.in_tune:
            return restore_sharded(Path(tempfile.gettempdir()) / "sharp-unlearn-no-checkpoint", sharded_dir)
        checkpoint = self.session.tune.get_checkpoint()
        if checkpoint is None:
            return restore_sharded(Path(tempfile.gettempdir()) / "sharp-unlearn-no-checkpoint", sharded_dir)
        with checkpoint.as_directory() as directory:
            return restore_sharded(Path(directory), sharded_dir)

    def report(self, metrics: dict[str, float], sharded_dir: Path | None = None) -> None:
        if not self.in_tune:
            self.session.report(metrics)
            return
        tune = self.session.tune
        with tempfile.TemporaryDirectory(prefix="sharp-unlearn-sharded-") as directory:
            has_state = sharded_dir is not None and snapshot_sharded(Path(sharded_dir), Path(directory)) is not None
            if self.export is not None:
                _write_json(Path(directory) / EXPORT_POINTER, {"export": str(self.export)})
                has_state = True
            if not has_state:
                tune.report(metrics)
                return
            # Ray persists the folder to the sweep's storage before report returns
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


# --------------------------------------------------------------------------- one Train run
def _relay_callback(queue):
    """A Ray Train callback (runs on the Train controller) that hands rank 0's records to the trial."""
    from ray.train import UserCallback

    class EpochRelay(UserCallback):
        def __init__(self, queue):
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint):
            self.queue.put(dict(metrics[0]))  # rank 0's record: every rank reports the same epoch

    return EpochRelay(queue)


def run_train(spec: dict[str, Any], *, cpus_per_worker: float, name: str,
              on_record: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the Ray Train DeepSpeed job of ``spec`` from inside a trial; rank 0's outcome.

    ``on_record(epoch, record)`` runs in the calling thread for every epoch the
    workers report, while they train on (it may raise: a scheduler's stop ends
    the trial, and the trial's process takes its Train run with it).
    """
    from ray.train import FailureConfig, RunConfig
    from ray.util.queue import Empty, Queue

    out_dir = Path(spec["out_dir"])
    (out_dir / OUTCOME_FILE).unlink(missing_ok=True)  # only this run's outcome counts
    queue = Queue(actor_options={"num_cpus": 0})
    # a dead worker fails this Train run at once (no retries inside): Tune retries the whole trial
    # from its checkpoint, counting the attempt against the sweep's max_failures
    run_config = RunConfig(name=name, storage_path=str(out_dir / "ray"), failure_config=FailureConfig(max_failures=0),
                           callbacks=[_relay_callback(queue)])
    trainer = build_torch_trainer(spec, run_config=run_config, cpus_per_worker=cpus_per_worker)
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the trial thread below
            failure.append(exc)

    thread = threading.Thread(target=fit, name=f"train-{name}", daemon=True)
    thread.start()
    try:
        while True:
            try:
                record = queue.get(timeout=_POLL_S)
            except Empty:
                if thread.is_alive():
                    continue
                if queue.empty():
                    break
                continue
            if on_record is not None:
                on_record(int(record["epoch"]), record)
    finally:
        with contextlib.suppress(Exception):
            queue.shutdown(force=True)
    thread.join()
    if failure:
        exc = failure[0]
        progress = _read_progress(out_dir / "deepspeed")
        where = (f"last committed sharded checkpoint: epoch {progress['epoch']} in {out_dir / 'deepspeed'}"
                 if progress else "no sharded checkpoint committed yet")
        raise RuntimeError(f"sharded trial's Train run failed ({type(exc).__name__}: {exc}); {where}") from None
    return json.loads((out_dir / OUTCOME_FILE).read_text())


def _completed_export(path: Path, config_hash: str, split_hash: str | None = None) -> dict[str, Any] | None:
    """A finished export of the same run (sharded pretraining caches by hash, as single-device does)."""
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    if not state.get("completed") or state.get("config_hash") != config_hash:
        return None
    if split_hash is not None and state.get("split_hash") != split_hash:
        return None
    return state


def _train_cached(cfg, *, kind: str, cpus_per_worker: float, name: str, train_indices=None,
                  split_hash: str | None = None, inputs: TrialInputs) -> tuple[Path, dict[str, Any]]:
    """Sharded pretraining (or a retrain reference) of ``cfg``, unless a finished export exists; (path, state)."""
    spec = make_spec(cfg, kind=kind, train_indices=train_indices, split_hash=split_hash, quiet=True)
    out_dir = Path(spec["out_dir"])
    export = out_dir / "checkpoint.pt"
    with cache_lock(inputs, out_dir):
        state = _completed_export(export, distributed_config_hash(cfg), split_hash or "full")
        if state is None or "final_metrics" not in state:
            outcome = run_train(spec, cpus_per_worker=cpus_per_worker, name=name)
            export = Path(outcome["checkpoint"])
            state = load_checkpoint(export)
    return export, state


# --------------------------------------------------------------------------- the trials
def _cpus(inputs: TrialInputs) -> float:
    return float(inputs.extra.get("cpus_per_worker", 1.0))


def sharded_pretrain_trial(inputs: TrialInputs, params: dict[str, Any], session) -> dict[str, float]:
    """Stage ``pretrain``, sharded: into the shared pretraining cache (sharded layout), reporting every epoch."""
    cfg, _ = trial_configs(inputs, params)
    sharded_session = ShardedSession(session)
    ledger = Ledger(inputs.ledger_dir, session.trial_id)
    spec = make_spec(cfg, kind="pretrain", quiet=True, resume=True)
    out_dir = Path(spec["out_dir"])
    export = out_dir / "checkpoint.pt"
    sharded_dir = out_dir / "deepspeed"
    # trials with the same pretraining config share its folder: one trains, the other waits and reuses it
    with cache_lock(inputs, out_dir):
        cached = _completed_export(export, distributed_config_hash(cfg), "full")
        start = None if cached else sharded_session.restore(sharded_dir)
        ledger.write("start", start_epoch=int(start or 0), stage="pretrain", sharded=True, cached=bool(cached))
        reporter = EpochReporter(sharded_session, inputs.objective, cfg.train.epochs, sharded_dir, ledger)
        if cached is not None and "final_metrics" in cached:
            metrics = dict(cached["final_metrics"])
        else:
            outcome = run_train(spec, cpus_per_worker=_cpus(inputs), name=f"{session.trial_id}-pretrain",
                                on_record=reporter.epoch)
            metrics = dict(outcome["metrics"])
        sharded_session.export = export
        return reporter.final(metrics)


def _measure(cfg, export: Path, pretrained, split, reference) -> dict[str, float]:
    """ToW of the consolidated export, on this process's CPU (the trial's own process holds no GPU)."""
    bundle = pretrained.bundle
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
    load_model_state(model, load_checkpoint(export)["model"], f"sharded export {str(export)!r}")
    groups = memorization_groups(split.scores, split.forget_positions) if split.scores is not None else None
    metrics = split_accuracies(model, bundle, split.forget_positions, split.retain_positions, "cpu",
                               cfg.data.eval_batch_size, groups)
    metrics["tow"] = tow(metrics, reference.metrics)
    metrics["forget_gap"] = forget_gap(metrics, reference.metrics)
    return metrics


def unlearn_run_dir(cfg, pretrained, split) -> Path:
    """A sharded unlearning trial's folder: one per (config, pretrained model, split)."""
    key = stable_hash({"cfg": {k: v for k, v in cfg.hash_tree().items() if k not in ("tracking", "output_dir")},
                       "pretrain": pretrained.state.get("config_hash"), "split": split.split_hash})
    return Path(cfg.output_dir) / "sweep-unlearn" / f"{split.label}-{cfg.method.name}-{cfg.optimizer.tag}-{key}"


def _sharded_unlearn(cfg, pretrained, split, reference, original, inputs: TrialInputs,
                     session) -> dict[str, float]:
    sharded_session = ShardedSession(session)
    ledger = Ledger(inputs.ledger_dir, session.trial_id)
    base = unlearn_run_dir(cfg, pretrained, split)
    # with the reference's accuracies the workers evaluate every epoch (ToW) sharded, and ASHA compares on it;
    # its checkpoint is recorded in the export, so `sharp-unlearn evaluate best_checkpoint.pt` finds it
    spec = make_unlearn_spec(cfg, pretrained.path, split, base, config_hash=base.name, quiet=True, resume=True,
                             reference_metrics=reference.metrics, reference_checkpoint=reference.checkpoint)
    out_dir = Path(spec["out_dir"])
    sharded_dir = out_dir / "deepspeed"
    export = out_dir / "unlearned_fp32.pt"
    with cache_lock(inputs, out_dir):
        done = _completed_export(export, base.name)
        start = None if done else sharded_session.restore(sharded_dir)
        ledger.write("start", start_epoch=int(start or 0), stage="unlearn", sharded=True, cached=bool(done))
        reporter = EpochReporter(sharded_session, inputs.objective, planned_epochs(cfg), sharded_dir, ledger,
                                 original)
        if done is not None:
            history, wall = list(done.get("history", [])), None
        else:
            try:
                outcome = run_train(spec, cpus_per_worker=_cpus(inputs), name=f"{session.trial_id}-unlearn",
                                    on_record=reporter.epoch)
            except RuntimeError as exc:
                if "TrainingDiverged" in str(exc):  # deterministic: retrying would diverge again
                    return reporter.diverged(str(exc))
                raise
            history, wall = list(outcome.get("history", [])), float(outcome["wall_seconds"])
        last = {k: v for k, v in (history[-1] if history else {}).items() if k != "epoch"}
        # the workers' own last-epoch evaluation when they report ToW; else measured here on the export
        final = last if "tow" in last else {**last, **_measure(cfg, export, pretrained, split, reference)}
        if wall is not None:
            final["wall_seconds"] = wall
        sharded_session.export = export
        return reporter.final(final, int(history[-1]["epoch"]) if history else None)


def sharded_unlearn_trial(inputs: TrialInputs, params: dict[str, Any], session) -> dict[str, float]:
    """Stage ``unlearn``, sharded: the driver's pretrained model, split and reference; the phases on N ranks."""
    _, cfg = trial_configs(inputs, params)
    pretrained = shared_pretrained(inputs.pretrained_bytes)
    # the workers read the driver's own file (output_dir is shared by every node of a sharded sweep)
    shared_path = inputs.extra.get("pretrained_path")
    if shared_path and Path(shared_path).is_file():
        pretrained = dataclasses.replace(pretrained, path=Path(shared_path))
    ref = inputs.reference
    reference = Reference(Path(ref["checkpoint"]), dict(ref["metrics"]), ref.get("run_id"),
                          float(ref.get("wall_seconds", 0.0)), cached=True)
    return _sharded_unlearn(cfg, pretrained, writable_split(inputs.split), reference, inputs.original, inputs,
                            session)


def sharded_both_trial(inputs: TrialInputs, params: dict[str, Any], session) -> dict[str, float]:
    """Stage ``both``, sharded: pretrain, its reference (both cached by hash), then unlearn; unlearning reported."""
    pre_cfg, cfg = trial_configs(inputs, params)
    cpus = _cpus(inputs)
    export, _ = _train_cached(pre_cfg, kind="pretrain", cpus_per_worker=cpus, inputs=inputs,
                              name=f"{session.trial_id}-pretrain")
    pretrained = load_pretrained(export)
    bundle = pretrained.bundle
    model = pretrained.model("cpu")  # the trial's own process holds no GPU
    split = select_forget_set(cfg.forget, bundle, pretrained.cfg.seed, model=model, device="cpu",
                              run_cfg=pretrained.cfg)
    ref_cfg = copy.deepcopy(pretrained.cfg)
    ref_path, ref_state = _train_cached(ref_cfg, kind="retrain", cpus_per_worker=cpus, inputs=inputs,
                                        train_indices=split.retain_positions, split_hash=split.split_hash,
                                        name=f"{session.trial_id}-retrain")
    ref_model = build_model(ref_cfg.model, bundle.num_classes, bundle.input_shape)
    load_model_state(ref_model, ref_state["model"], "retrain reference")
    ref_metrics = split_accuracies(ref_model, bundle, split.forget_positions, split.retain_positions, "cpu",
                                   ref_cfg.data.eval_batch_size)
    wall = float(ref_state.get("wall_seconds", 0.0))
    ref_metrics["wall_seconds"] = wall
    reference = Reference(ref_path, ref_metrics, ref_state.get("run_id"), wall, cached=True)
    original = split_accuracies(model, bundle, split.forget_positions, split.retain_positions, "cpu",
                                cfg.data.eval_batch_size)
    original["tow"] = tow(original, reference.metrics)
    return _sharded_unlearn(cfg, pretrained, split, reference, original, inputs, session)


SHARDED_TRIALS = {"pretrain": sharded_pretrain_trial, "unlearn": sharded_unlearn_trial, "both": sharded_both_trial}


@contextlib.contextmanager
def exported(checkpoint) -> Iterator[Path | None]:
    """The consolidated export a finished trial's Tune checkpoint names (None when it names none)."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        pointer = Path(directory) / EXPORT_POINTER
        yield Path(json.loads(pointer.read_text())["export"]) if pointer.is_file() else None
