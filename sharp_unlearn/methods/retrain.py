"""Retrain: the exact-unlearning baseline, as a method name.

Nothing is unlearned from the checkpoint: the recipe trains a fresh model on
the retain set with the *pretraining* recipe (the cached reference), so this
class only marks ``from_scratch`` and has no phases.
"""
from __future__ import annotations

from sharp_unlearn.engine.objective import Phase
from sharp_unlearn.methods.base import METHODS, UnlearningMethod


@METHODS.register("retrain")
class Retrain(UnlearningMethod):
    from_scratch = True
    streams = ("retain",)

    def phases(self, epoch: int) -> list[Phase]:
        raise RuntimeError("method 'retrain' has no unlearning phases: the recipe trains from scratch on the "
                           "retain set with the pretraining recipe (check `from_scratch` before run_stage)")

    @property
    def epochs(self) -> int:
        return 0
