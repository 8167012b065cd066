"""The one epoch driver: every training stage (pretraining, the retrained reference, each
unlearning method's phases) runs its epochs here, on a *backend*.

The driver owns what is the same at every scale: seeding and determinism, the
data streams (global batches), the optimizer and lr schedule, resuming, the
per-epoch records (losses, lr, evaluation), progress, tracking, checkpoint
cadence and ``on_epoch_end``. A backend owns what depends on where the model
lives:

* :class:`LocalBackend` - one device: :class:`~sharp_unlearn.engine.loop.Trainer`
  and one torch checkpoint file (model, optimizer, scheduler, history);
* :class:`~sharp_unlearn.engine.deepspeed_backend.DeepSpeedBackend` - N ranks, ZeRO 0-3:
  :class:`~sharp_unlearn.engine.deepspeed_engine.DeepSpeedTrainer`, DeepSpeed's
  sharded checkpoints and a consolidated fp32 export.

With a backend of N ranks every rank calls :func:`run_epochs` with the same
arguments; ``evaluate(model, epoch)`` then runs on every rank and receives the
backend's ``eval_model`` (a model whose forward splits each batch's rows over
the ranks), so single-process metric code gives single-process numbers.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from sharp_unlearn.config import ExperimentConfig, OptimizerConfig, TrainConfig
from sharp_unlearn.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from sharp_unlearn.engine.determinism import apply_determinism
from sharp_unlearn.engine.loop import Timer, Trainer, epoch_seed, make_loader
from sharp_unlearn.engine.objective import Phase
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.optim.factory import build_base_optimizer, build_scheduler
from sharp_unlearn.progress import progress_bar
from sharp_unlearn.tracking import NullTracker


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was requested but no CUDA device is available; use device=cpu or auto")
    return torch.device(name)


@dataclass
class StageResult:
    checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    wall_seconds: float = 0.0
    resumed_from: int = 0


@dataclass
class Resumed:
    """What a backend restored besides the weights and optimizer state."""

    epoch: int
    history: list[dict[str, float]]
    #: wall time of the interrupted parts so far
    wall_seconds: float


@dataclass
class StageState:
    """Where a stage stands, besides the weights: what a checkpoint records and a resume restores."""

    epoch: int
    completed: bool
    history: list[dict[str, float]]
    #: wall time of the stage so far, earlier (interrupted) parts included
    wall_seconds: float
    meta: Mapping[str, Any]
    cfg: ExperimentConfig


class Backend(Protocol):
    """Where a stage's model lives and how its state is kept (see the module docstring)."""

    device: torch.device
    #: the ranks that run the stage together; data streams yield global batches of batch_size * world_size
    world_size: int
    #: 0 on the rank that shows progress
    rank: int

    def start(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, train_cfg: TrainConfig,
              cfg: ExperimentConfig) -> Trainer:
        """Wrap the model (and optimizer, schedule) for training; returns the trainer that runs phases."""

    @property
    def eval_model(self) -> Any:
        """What ``evaluate`` receives: a model the single-process metric code can call."""

    def resume(self, meta: Mapping[str, Any]) -> Resumed | None:
        """Load the newest unfinished state written with this ``meta["config_hash"]``, if any."""

    def sync(self) -> None:
        """After an epoch's training, before evaluating and saving: make the ranks' copies agree."""

    def save(self, state: StageState) -> None:
        """Write a resumable checkpoint of ``state`` (all ranks call this)."""

    def finish(self, state: StageState) -> Path | None:
        """Save the completed stage; returns the checkpoint single-device commands load."""


class LocalBackend:
    """One device: :class:`Trainer` and one torch checkpoint file, written atomically."""

    world_size = 1
    rank = 0

    def __init__(self, device: torch.device, checkpoint_path: Path | None = None):
        self.device = device
        self.checkpoint_path = checkpoint_path

    def start(self, model, optimizer, scheduler, train_cfg, cfg) -> Trainer:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        return Trainer(model, optimizer, scheduler, device=self.device, grad_accum=train_cfg.grad_accum,
                       grad_clip=train_cfg.grad_clip)

    @property
    def eval_model(self) -> nn.Module:
        return self.model

    def resume(self, meta) -> Resumed | None:
        path = self.checkpoint_path
        if path is None or not path.exists():
            return None
        state = load_checkpoint(path, map_location=self.device)
        if state.get("config_hash") != meta.get("config_hash") or state.get("completed", False):
            return None
        load_model_state(self.model, state["model"], f"checkpoint {path}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return Resumed(int(state["epoch"]), list(state.get("history", [])), float(state.get("wall_seconds", 0.0)))

    def sync(self) -> None:
        pass

    def save(self, state: StageState) -> None:
        if self.checkpoint_path is None:
            return
        save_checkpoint(self.checkpoint_path, {
            **state.meta,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": state.epoch,
            "completed": state.completed,
            "history": state.history,
            "config": state.cfg.to_dict(),
            "wall_seconds": state.wall_seconds,
        })

    def finish(self, state: StageState) -> Path | None:
        self.save(state)
        return self.checkpoint_path


def steps_per_epoch(phases: list[Phase], datasets: Mapping[str, Dataset], batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch of ``phases`` (lr schedules count steps)."""
    if not phases or not len(datasets[phases[0].driver_stream]):
        return 1
    return sum(min(math.ceil(math.ceil(len(datasets[p.driver_stream]) / batch_size) / grad_accum),
                   p.max_steps or 10**12) for p in phases)


def run_epochs(
    model: nn.Module,
    phases_fn: Callable[[int], list[Phase]],
    datasets: Mapping[str, Dataset],
    *,
    backend: Backend,
    cfg: ExperimentConfig,
    optimizer_cfg: OptimizerConfig,
    train_cfg: TrainConfig,
    epochs: int,
    checkpoint_meta: Mapping[str, Any] | None = None,
    evaluate: Callable[[Any, int], dict[str, float]] | None = None,
    tracker: NullTracker | None = None,
    quiet: bool = False,
    description: str = "train",
    resume: bool = True,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> StageResult:
    """Train ``model`` for ``epochs`` epochs of ``phases_fn(epoch)`` on ``backend``.

    ``datasets`` maps stream names ("train", "retain", "forget") to data sets.
    A checkpoint is written every ``train_cfg.checkpoint_every`` epochs and at
    the end; with ``resume`` an unfinished checkpoint whose ``config_hash``
    matches is continued from its epoch. ``evaluate(model, epoch)`` runs after
    the last epoch and every ``train_cfg.eval_every`` epochs.

    ``on_epoch_end(epoch, record)`` runs after each epoch's checkpoint is on
    disk (the last epoch's after the final save), so a caller can ship that
    file elsewhere (a Ray Tune trial reports it as its checkpoint).
    """
    tracker = tracker or NullTracker()
    apply_determinism(cfg)  # every stage passes here: threads and kernels are fixed before the first step
    meta = dict(checkpoint_meta or {})
    model.to(backend.device)
    optimizer = build_base_optimizer(model.parameters(), optimizer_cfg)
    # every rank's stream yields the *global* batch (the order one process with that batch would see)
    batch_size = cfg.data.batch_size * backend.world_size
    seed = cfg.seed

    def stream_factory(name: str, salt: int, epoch: int):
        dataset = datasets[name]
        return lambda pass_no: make_loader(dataset, batch_size, shuffle=True, seed=seed,
                                           epoch=epoch * 1000 + pass_no, salt=salt,
                                           num_workers=cfg.data.num_workers)

    # schedules are per optimizer step: steps per epoch from the first epoch's phases
    steps = steps_per_epoch(phases_fn(0) if epochs > 0 else [], datasets, batch_size, train_cfg.grad_accum)
    scheduler = build_scheduler(optimizer, train_cfg, max(1, steps), epochs)
    trainer = backend.start(model, optimizer, scheduler, train_cfg, cfg)

    resumed = backend.resume(meta) if resume else None
    start_epoch = resumed.epoch if resumed else 0
    history: list[dict[str, float]] = resumed.history if resumed else []
    # wall time of the earlier parts of a resumed stage (kept in the checkpoint), so the reported
    # wall_seconds is the whole stage's, not only the part after the last interruption
    prior_seconds = resumed.wall_seconds if resumed else 0.0
    timer = Timer()
    stream_salts = {name: i + 1 for i, name in enumerate(sorted(datasets))}

    def state(epoch: int, completed: bool) -> StageState:
        return StageState(epoch, completed, history, prior_seconds + timer.seconds, meta, cfg)

    with progress_bar(description, max(epochs - start_epoch, 0), quiet or backend.rank != 0) as advance:
        for epoch in range(start_epoch, epochs):
            torch.manual_seed(epoch_seed(seed, epoch, 99))  # dropout / augmentation, resume-stable
            # SAM variants: reuse restarts with a full step and subsets draw anew each epoch, so resuming
            # from an epoch checkpoint takes the same steps as an uninterrupted run
            trainer.sam_variants.restart(epoch_seed(seed, epoch, 98))
            record: dict[str, float] = {"epoch": epoch + 1}
            phases = phases_fn(epoch)
            for phase in phases:
                streams = {name: stream_factory(name, stream_salts[name], epoch) for name in datasets}
                losses = trainer.run_phase(phase, streams)
                for key, value in losses.items():
                    record[f"loss_{phase.name}_{key}" if len(phases) > 1 else f"loss_{key}"] = value
            record["train_loss"] = float(sum(v for k, v in record.items() if k.startswith("loss_")))
            record["lr"] = optimizer.param_groups[0]["lr"]
            backend.sync()
            last = epoch + 1 == epochs
            if evaluate is not None and (last or (train_cfg.eval_every and (epoch + 1) % train_cfg.eval_every == 0)):
                record.update(evaluate(backend.eval_model, epoch + 1))
            history.append(record)
            tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
            if not last and train_cfg.checkpoint_every and (epoch + 1) % train_cfg.checkpoint_every == 0:
                backend.save(state(epoch + 1, completed=False))
            advance(status=f"loss {record['train_loss']:.3f}")
            if on_epoch_end is not None and not last:
                on_epoch_end(epoch + 1, record)
    checkpoint = backend.finish(state(epochs, completed=True))
    if on_epoch_end is not None and start_epoch < epochs and history:
        on_epoch_end(epochs, history[-1])
    return StageResult(checkpoint, history, prior_seconds + timer.seconds, start_epoch)
