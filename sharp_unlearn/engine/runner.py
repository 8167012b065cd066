"""Run a training stage end to end: seeding, epochs, evaluation, checkpoints, resume.

Pretraining, the retrained reference and unlearning all go through
:func:`run_stage`; they differ only in the phases they optimize and the data
streams that feed them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from sharp_unlearn.config import ExperimentConfig, OptimizerConfig, TrainConfig
from sharp_unlearn.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from sharp_unlearn.engine.determinism import apply_determinism
from sharp_unlearn.engine.loop import Timer, Trainer, epoch_seed, make_loader
from sharp_unlearn.engine.objective import Phase
from sharp_unlearn.optim.factory import build_base_optimizer, build_scheduler
from sharp_unlearn.progress import progress_bar
from sharp_unlearn.tracking import NullTracker


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from sharp_unlearn.errors import ConfigError

        raise ConfigError("device='cuda' was requested but no CUDA device is available; use device=cpu or auto")
    return torch.device(name)


@dataclass
class StageResult:
    checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    wall_seconds: float = 0.0
    resumed_from: int = 0


def run_stage(
    model: nn.Module,
    phases_fn: Callable[[int], list[Phase]],
    datasets: Mapping[str, Dataset],
    *,
    cfg: ExperimentConfig,
    optimizer_cfg: OptimizerConfig,
    train_cfg: TrainConfig,
    epochs: int,
    device: torch.device,
    checkpoint_path: Path | None = None,
    checkpoint_meta: Mapping[str, Any] | None = None,
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
    tracker: NullTracker | None = None,
    quiet: bool = False,
    description: str = "train",
    resume: bool = True,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> StageResult:
    """Train ``model`` for ``epochs`` epochs of ``phases_fn(epoch)``.

    ``datasets`` maps stream names ("train", "retain", "forget") to data sets.
    A checkpoint is written atomically every ``train_cfg.checkpoint_every``
    epochs and at the end; with ``resume`` an unfinished checkpoint whose
    ``config_hash`` matches is continued from its epoch.

    ``on_epoch_end(epoch, record)`` runs after each epoch's checkpoint is on
    disk (the last epoch's after the final save), so a caller can ship that
    file elsewhere (a Ray Tune trial reports it as its checkpoint).
    """
    tracker = tracker or NullTracker()
    apply_determinism(cfg)  # every stage passes here: threads and kernels are fixed before the first step
    meta = dict(checkpoint_meta or {})
    model.to(device)
    optimizer = build_base_optimizer(model.parameters(), optimizer_cfg)
    batch_size = cfg.data.batch_size
    seed = cfg.seed

    def stream_factory(name: str, salt: int, epoch: int):
        dataset = datasets[name]
        return lambda pass_no: make_loader(dataset, batch_size, shuffle=True, seed=seed,
                                           epoch=epoch * 1000 + pass_no, salt=salt,
                                           num_workers=cfg.data.num_workers)

    # steps per epoch from the first phase's driver (schedules are per optimizer step)
    first_phases = phases_fn(0) if epochs > 0 else []
    if first_phases:
        driver_len = len(datasets[first_phases[0].driver_stream])
        steps_per_epoch = sum(
            min(math.ceil(math.ceil(len(datasets[p.driver_stream]) / batch_size) / train_cfg.grad_accum),
                p.max_steps or 10**12)
            for p in first_phases) if driver_len else 1
    else:
        steps_per_epoch = 1
    scheduler = build_scheduler(optimizer, train_cfg, max(1, steps_per_epoch), epochs)
    trainer = Trainer(model, optimizer, scheduler, device=device, grad_accum=train_cfg.grad_accum,
                      grad_clip=train_cfg.grad_clip)

    start_epoch = 0
    history: list[dict[str, float]] = []
    # wall time of the earlier parts of a resumed stage (kept in the checkpoint), so the reported
    # wall_seconds is the whole stage's, not only the part after the last interruption
    prior_seconds = 0.0
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, map_location=device)
        if state.get("config_hash") == meta.get("config_hash") and not state.get("completed", False):
            load_model_state(model, state["model"], f"checkpoint {checkpoint_path}")
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"])
            history = list(state.get("history", []))
            prior_seconds = float(state.get("wall_seconds", 0.0))

    timer = Timer()
    stream_salts = {name: i + 1 for i, name in enumerate(sorted(datasets))}

    def save(epoch: int, completed: bool) -> None:
        if checkpoint_path is None:
            return
        save_checkpoint(checkpoint_path, {
            **meta,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "completed": completed,
            "history": history,
            "config": cfg.to_dict(),
            "wall_seconds": prior_seconds + timer.seconds,
        })

    with progress_bar(description, max(epochs - start_epoch, 0), quiet) as advance:
        for epoch in range(start_epoch, epochs):
            torch.manual_seed(epoch_seed(seed, epoch, 99))  # dropout / augmentation, resume-stable
            record: dict[str, float] = {"epoch": epoch + 1}
            for phase in phases_fn(epoch):
                streams = {name: stream_factory(name, stream_salts[name], epoch) for name in datasets}
                losses = trainer.run_phase(phase, streams)
                for key, value in losses.items():
                    record[f"loss_{phase.name}_{key}" if len(phases_fn(epoch)) > 1 else f"loss_{key}"] = value
            record["train_loss"] = float(sum(v for k, v in record.items() if k.startswith("loss_")))
            record["lr"] = optimizer.param_groups[0]["lr"]
            last = epoch + 1 == epochs
            if evaluate is not None and (last or (train_cfg.eval_every and (epoch + 1) % train_cfg.eval_every == 0)):
                record.update(evaluate(model, epoch + 1))
            history.append(record)
            tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
            if not last and train_cfg.checkpoint_every and (epoch + 1) % train_cfg.checkpoint_every == 0:
                save(epoch + 1, completed=False)
            advance(status=f"loss {record['train_loss']:.3f}")
            if on_epoch_end is not None and not last:
                on_epoch_end(epoch + 1, record)
    save(epochs, completed=True)
    if on_epoch_end is not None and start_epoch < epochs:
        on_epoch_end(epochs, history[-1])
    return StageResult(checkpoint_path, history, prior_seconds + timer.seconds, start_epoch)
