"""SalUn (Fan et al. 2024): saliency-restricted random labelling.

1. ``prepare``: the saliency mask M marks the largest ``mask_fraction`` of
   ``|grad L_F|`` over all parameters (the smallest with
   ``method.mask_order=smallest``, as the Sharp MinMax paper's released mask
   generator does; ``ctx.mask``, ``method.mask_path`` or computed on the spot;
   see :func:`saliency_mask_for`).
2. Each step: cross-entropy on the forget set with fixed random wrong labels,
   plus cross-entropy on the retain set (the RL objectives), with both
   gradients restricted to M: entries outside the mask never move.
"""
from __future__ import annotations

from sharp_unlearn.engine.objective import Phase
from sharp_unlearn.methods.base import METHODS, UnlearnContext, saliency_mask_for
from sharp_unlearn.methods.random_label import RandomLabel


@METHODS.register("salun")
class SalUn(RandomLabel):
    mask: dict | None = None

    def prepare(self, ctx: UnlearnContext) -> None:
        super().prepare(ctx)
        self.mask = saliency_mask_for(ctx, self.cfg)
        return None

    def phases(self, epoch: int) -> list[Phase]:
        if self.mask is None:
            raise RuntimeError("SalUn.prepare(ctx) must run before phases()")
        return [Phase("salun", self.objectives(mask=self.mask), driver="retain")]
