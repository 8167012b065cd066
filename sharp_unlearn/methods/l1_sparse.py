"""l1-sparse (Jia et al. 2023, "Model sparsity can simplify machine unlearning").

Fine-tune on the retain set with an L1 penalty on all trainable weights,
``CE_R + gamma_e * ||w||_1``, where ``gamma_e = l1_weight * (1 - e / E)``
decays linearly over the unlearning epochs (the schedule the paper found
best: sparsify early, then let the retain loss recover accuracy).

The penalty is its own first-order objective: SAM perturbs along the retain
loss only, as perturbing along a sign vector would say nothing about the
loss landscape.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sharp_unlearn.config import check_range
from sharp_unlearn.engine.objective import Objective, Phase
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.methods.base import METHODS, UnlearningMethod


def l1_penalty(weight: float):
    def loss(model, batch) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        return weight * torch.stack([p.abs().sum() for p in params]).sum()

    return loss


@dataclass
class L1SparseParams:
    """l1-sparse's setting (a key of the method section)."""

    #: weight of the L1 penalty at the first epoch (decays linearly to 0 over the epochs)
    l1_weight: float = 5e-4

    def __post_init__(self) -> None:
        check_range("method.l1_weight", self.l1_weight, 0.0)


@METHODS.register("l1_sparse")
class L1Sparse(UnlearningMethod):
    streams = ("retain",)
    params_class = L1SparseParams
    params: L1SparseParams

    def l1_weight_at(self, epoch: int) -> float:
        epochs = max(self.epochs, 1)
        return self.params.l1_weight * max(0.0, 1.0 - epoch / epochs)

    def phases(self, epoch: int) -> list[Phase]:
        objectives = [Objective("retain", "retain", cross_entropy, sam=self.sam)]
        weight = self.l1_weight_at(epoch)
        if weight > 0:
            objectives.append(Objective("l1", "retain", l1_penalty(weight)))
        return [Phase("l1_sparse", objectives, driver="retain")]
