"""Build base optimizers, SAM specs and per-step lr schedules from configs."""
from __future__ import annotations

import math

import torch

from sharp_unlearn.config import OptimizerConfig, TrainConfig
from sharp_unlearn.optim.sam import SamSpec, SamVariant
from sharp_unlearn.optim.side_states import side_states_of


def build_base_optimizer(params, cfg: OptimizerConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """The first-order optimizer that steps the weights (SAM only changes the gradient)."""
    lr = cfg.lr if lr is None else lr
    name = cfg.base_name
    if name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum,
                                    nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    elif name == "adam":
        optimizer = torch.optim.Adam(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown base optimizer {name!r}")  # config validation makes this unreachable
    # sequential updates' second optimizer state must load with the first, whenever a runner resumes
    side_states_of(optimizer)
    return optimizer


def sam_variant(cfg: OptimizerConfig) -> SamVariant:
    """How cheaply every SAM pass of the stage runs (``optimizer.sam_*``; the defaults are exact SAM)."""
    return SamVariant(every=cfg.sam_every, fraction=cfg.sam_fraction, subset=cfg.sam_subset)


def sam_spec(cfg: OptimizerConfig) -> SamSpec | None:
    """The SAM semantics of the configured optimizer, or None for a first-order one."""
    if not cfg.is_sam:
        return None
    return SamSpec(rho=cfg.rho, lamb=cfg.lamb, sign=cfg.sign, adaptive=cfg.adaptive, variant=sam_variant(cfg))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, steps_per_epoch: int,
                    epochs: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up, then cosine / multi-step / constant."""
    epochs = train.epochs if epochs is None else epochs
    total = max(1, epochs * steps_per_epoch)
    warmup = train.warmup_epochs * steps_per_epoch
    milestones = [m * steps_per_epoch for m in train.milestones]

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if train.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if train.schedule == "multistep":
            return train.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
