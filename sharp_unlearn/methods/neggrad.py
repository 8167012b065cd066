"""NegGrad+: descend on the retain loss, ascend on the forget loss.

Objective ``alpha * L_R - (1 - alpha) * L_F`` as two objectives on their own
streams, both with the run's optimizer (SGD, or SAM with its sign/radius).
Methods that only change what the forget side minimizes (NPO) subclass it and
override :meth:`NegGradPlus.forget_loss`.
"""
from __future__ import annotations

import torch
from torch import nn

from sharp_unlearn.engine.objective import Batch, Objective, Phase
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.methods.base import METHODS, UnlearningMethod, scaled


@METHODS.register("neggrad")
class NegGradPlus(UnlearningMethod):
    #: the phase's name in progress output and logs
    phase_name = "neggrad"
    #: what forget_loss averages over (Objective.mean_over): cross-entropy's scored labels
    forget_mean_over = "labels"

    def forget_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """What the forget side minimizes, weighted by ``1 - alpha``: here the negated cross-entropy (ascent)."""
        return -cross_entropy(model, batch)

    def phases(self, epoch: int) -> list[Phase]:
        alpha = self.cfg.alpha
        objectives = []
        if alpha > 0:
            objectives.append(Objective("retain", "retain", scaled(cross_entropy, alpha), sam=self.sam))
        if alpha < 1:
            objectives.append(Objective("forget", "forget", scaled(self.forget_loss, 1.0 - alpha), sam=self.sam,
                                        mean_over=self.forget_mean_over))
        return [Phase(self.phase_name, objectives, driver="forget" if alpha == 0 else "retain")]
