"""Gradient ascent (GA): maximize the forget loss, nothing else.

Minimizes ``-CE`` on the forget set; one epoch is one pass over the forget
set. With nothing anchoring the retain set it degrades the model quickly:
keep epochs and lr small (it is the lower baseline of the family).
"""
from __future__ import annotations

from sharp_unlearn.engine.objective import Objective, Phase
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.methods.base import METHODS, UnlearningMethod, scaled


@METHODS.register("grad_ascent")
class GradAscent(UnlearningMethod):
    streams = ("forget",)

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("grad_ascent", [Objective("forget", "forget", scaled(cross_entropy, -1.0), sam=self.sam)],
                      driver="forget")]
