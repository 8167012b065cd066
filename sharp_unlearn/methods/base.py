"""The method contract: a method describes objectives; the engine optimizes them.

A method is constructed from the run's MethodConfig and OptimizerConfig,
``prepare`` sees the model about to be unlearned (to build masks, a teacher,
random labels...), and ``phases(epoch)`` returns what to optimize that epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from sharp_unlearn.config import MethodConfig, OptimizerConfig
from sharp_unlearn.engine.objective import Batch, Phase, SamSpec
from sharp_unlearn.registry import Registry

#: name -> UnlearningMethod subclass
METHODS: Registry = Registry("unlearning method")


@dataclass
class UnlearnContext:
    """What a method may look at before unlearning starts."""

    model: nn.Module
    retain: Dataset
    forget: Dataset
    num_classes: int
    device: torch.device
    seed: int
    batch_size: int = 64
    #: optional precomputed saliency mask {param name: 0/1 tensor}
    mask: dict[str, torch.Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class UnlearningMethod:
    #: streams this method reads; "retain" and/or "forget"
    streams: tuple[str, ...] = ("retain", "forget")

    def __init__(self, cfg: MethodConfig, optimizer: OptimizerConfig, sam: SamSpec | None):
        self.cfg = cfg
        self.optimizer_cfg = optimizer
        #: SAM semantics of the run's optimizer (None for sgd/adam/adamw)
        self.sam = sam

    def prepare(self, ctx: UnlearnContext) -> None:
        """Build whatever the objectives need (default: nothing)."""

    def phases(self, epoch: int) -> list[Phase]:
        raise NotImplementedError

    @property
    def optimizer_tag(self) -> str:
        """The MLflow ``optimizer`` tag for runs of this method."""
        return self.optimizer_cfg.tag

    @property
    def epochs(self) -> int:
        return self.cfg.epochs


def cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch.x), batch.y)


def scaled(loss_fn, weight: float):
    """``weight * loss_fn`` (negative weights make ascent objectives)."""

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return weight * loss_fn(model, batch)

    return loss
