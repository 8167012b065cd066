"""NegGrad+: descend on the retain loss, ascend on the forget loss.

Objective ``alpha * L_R - (1 - alpha) * L_F`` as two objectives on their own
streams, both with the run's optimizer (SGD, or SAM with its sign/radius).
"""
from __future__ import annotations

from sharp_unlearn.engine.objective import Objective, Phase
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.methods.base import METHODS, UnlearningMethod, scaled


@METHODS.register("neggrad")
class NegGradPlus(UnlearningMethod):
    def phases(self, epoch: int) -> list[Phase]:
        alpha = self.cfg.alpha
        objectives = []
        if alpha > 0:
            objectives.append(Objective("retain", "retain", scaled(cross_entropy, alpha), sam=self.sam))
        if alpha < 1:
            objectives.append(Objective("forget", "forget", scaled(cross_entropy, -(1.0 - alpha)), sam=self.sam))
        return [Phase("neggrad", objectives, driver="forget" if alpha == 0 else "retain")]
