"""What a training stage optimizes, as data: objectives grouped into phases.

Methods (and pretraining) only *describe* objectives; the loop in
:mod:`sharp_unlearn.engine.loop` owns backward passes, SAM's two passes,
masking, accumulation and stepping. Sharp MinMax is then two objectives with
complementary masks, NegGrad+ two plain objectives, SCRUB two phases.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

# SamSpec lives with SAM in optim (the layer below); objectives name it, so it is importable from here too
from sharp_unlearn.optim.sam import SamSpec


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True),
                     self.index.to(device, non_blocking=True))


#: loss(model, batch) -> scalar tensor to *minimize* (ascent objectives return a negated loss)
LossFn = Callable[[nn.Module, Batch], torch.Tensor]

MASK_SCOPES = ("update", "perturbed")
PERTURBATIONS = ("masked", "full")
MEANS_OVER = ("labels", "examples")


@dataclass
class Objective:
    """One loss on one data stream, with the optimizer semantics it gets.

    ``mask`` maps parameter names to 0/1 tensors of the same shape: the entries
    this objective may move (its gradient is zeroed elsewhere, and SAM's
    perturbation lives in the same subspace). ``None`` means every parameter.

    Two switches relax the mask for a SAM objective (the Sharp MinMax paper's
    released code runs its forget side this way):

    * ``mask_scope``: ``update`` masks the final gradient; ``perturbed`` masks
      only the gradient at ``w+e``, so the update is ``g + s*lamb*(M*g2 - g)``
      with the clean ``g`` unmasked (an objective without a SAM pass is then
      masked whole, as the released code's first-order path does);
    * ``perturbation``: ``masked`` builds ``e`` from ``M*g`` and keeps it in the
      mask; ``full`` builds it from ``g`` over every parameter.

    ``step_group`` orders base-optimizer steps inside one engine step:
    objectives sharing a group are summed into one step; different groups step
    one after another in order of first appearance, each at the weights the
    previous one left and each with its own base-optimizer state. ``None``
    (every objective) is one summed step.

    ``mean_over`` says what the loss averages over, which a sharded engine
    needs to weight each rank's slice of a batch: ``labels``, the scored labels
    (not ``-100``), as :func:`sharp_unlearn.losses.cross_entropy` does (a
    classifier's rows, a causal LM's answer tokens); ``examples``, the rows
    (NPO's per-sequence loss). One process sees the whole batch and ignores it.
    """

    name: str
    stream: str
    loss: LossFn
    sam: SamSpec | None = None
    mask: dict[str, torch.Tensor] | None = None
    mask_scope: str = "update"
    perturbation: str = "masked"
    step_group: str | None = None
    mean_over: str = "labels"

    def __post_init__(self) -> None:
        # internal contract (methods build objectives from validated configs): a typo here is a bug
        if self.mask_scope not in MASK_SCOPES:
            raise ValueError(f"objective {self.name!r}: mask_scope={self.mask_scope!r}; expected one of {MASK_SCOPES}")
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"objective {self.name!r}: perturbation={self.perturbation!r}; "
                             f"expected one of {PERTURBATIONS}")
        if self.mean_over not in MEANS_OVER:
            raise ValueError(f"objective {self.name!r}: mean_over={self.mean_over!r}; expected one of {MEANS_OVER}")

    @property
    def optimizer_tag(self) -> str:
        return self.sam.tag if self.sam is not None else "first-order"


def step_groups(objectives: Sequence[Objective]) -> list[list[Objective]]:
    """Objectives split by ``step_group``, groups in order of first appearance."""
    groups: dict[str | None, list[Objective]] = {}
    for objective in objectives:
        groups.setdefault(objective.step_group, []).append(objective)
    return list(groups.values())


@dataclass
class Phase:
    """Objectives stepped together; one pass over ``driver`` (default: the first
    objective's stream) is the phase's length, other streams are cycled."""

    name: str
    objectives: list[Objective]
    driver: str | None = None
    #: stop the phase after this many optimizer steps (None: a full pass over the driver)
    max_steps: int | None = None
    extras: dict = field(default_factory=dict)

    @property
    def driver_stream(self) -> str:
        return self.driver or self.objectives[0].stream
