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

from sharp_unlearn.engine.driver import LocalBackend, StageResult, resolve_device, run_epochs
from sharp_unlearn.engine.objective import Phase

__all__ = ["StageResult", "resolve_device", "run_stage"]


def run_stage(model: nn.Module, phases_fn: Callable[[int], list[Phase]], datasets: Mapping[str, Dataset], *,
              device: torch.device, checkpoint_path: Path | None = None, **driver_options: Any) -> StageResult:
    """:func:`~sharp_unlearn.engine.driver.run_epochs` on ``device``, checkpointing to ``checkpoint_path``
    (one torch file: model, optimizer, scheduler, history; written atomically); ``driver_options``
    are run_epochs' (cfg, optimizer_cfg, train_cfg, epochs, evaluate, on_epoch_end, ...)."""
    return run_epochs(model, phases_fn, datasets, backend=LocalBackend(device, checkpoint_path), **driver_options)
