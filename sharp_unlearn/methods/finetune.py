"""Fine-tune (FT): keep training on the retain set only; forgetting comes from
catastrophic forgetting of what only the forget set supported."""
from __future__ import annotations

from sharp_unlearn.engine.objective import Objective, Phase
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.methods.base import METHODS, UnlearningMethod


@METHODS.register("finetune")
class Finetune(UnlearningMethod):
    streams = ("retain",)

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("finetune", [Objective("retain", "retain", cross_entropy, sam=self.sam)])]
