"""Run a training stage on one device: :func:`run_stage` is the epoch driver
(:func:`sharp_unlearn.engine.driver.run_epochs`) with the single-device backend.

Pretraining, the retrained reference and unlearning all run through the
driver; they differ only in the phases they optimize and the data streams
that feed them.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from sharp_unlearn.config import ExperimentConfig, OptimizerConfig, TrainConfig
from sharp_unlearn.engine.driver import LocalBackend, StageResult, resolve_device, run_epochs
from sharp_unlearn.engine.objective import Phase
from sharp_unlearn.tracking import NullTracker

__all__ = ["StageResult", "resolve_device", "run_stage"]


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
    """:func:`~sharp_unlearn.engine.driver.run_epochs` on ``device``, checkpointing to ``checkpoint_path``
    (one torch file: model, optimizer, scheduler, history; written atomically)."""
    return run_epochs(model, phases_fn, datasets, backend=LocalBackend(device, checkpoint_path), cfg=cfg,
                      optimizer_cfg=optimizer_cfg, train_cfg=train_cfg, epochs=epochs,
                      checkpoint_meta=checkpoint_meta, evaluate=evaluate, tracker=tracker, quiet=quiet,
                      description=description, resume=resume, on_epoch_end=on_epoch_end)
