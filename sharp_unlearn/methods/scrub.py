"""SCRUB (Kurmanji et al. 2023): a student moves away from its teacher on the
forget set and stays close to it on the retain set.

The teacher is a frozen copy of the model made in ``prepare`` (eval mode, no
gradients, never stepped: it is not part of the model the engine optimizes).
The student is the model itself. With ``KL_T(t || s)`` the temperature-``T``
distillation divergence (scaled by ``T^2`` as usual, so its gradients keep
their size across temperatures):

* epochs ``< max_epochs``: a **max** phase, one pass over the forget set
  minimizing ``-KL_T(teacher || student)``, then a **min** phase;
* every epoch: the **min** phase, one pass over the retain set minimizing
  ``kd_weight * KL_T(teacher || student) + ce_weight * CE``.

Both phases use the run's optimizer (SGD, Adam or SAM/ASAM with its sign).

On a causal LM (logits ``(batch, tokens, vocab)``, answer-only labels) both terms are means over the
answer tokens: the divergence is token-level and the prompt's positions are not distilled.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from sharp_unlearn.config import check_range
from sharp_unlearn.engine.objective import Batch, Objective, Phase
from sharp_unlearn.losses import IGNORE_INDEX, logits_cross_entropy
from sharp_unlearn.methods.base import METHODS, UnlearnContext, UnlearningMethod


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over a classifier batch's rows (logits
    ``(B, C)``), or over the scored tokens of causal-LM logits ``(B, T, V)``: the positions whose label is
    not ``-100`` (the answer), so the prompt and the padding neither count nor move the student."""
    t = temperature
    if student_logits.dim() == 3:
        if labels is None:
            raise ValueError("sequence logits (B, T, V) need their labels to know which tokens are scored")
        scored = labels != IGNORE_INDEX
        student_logits, teacher_logits = student_logits[scored], teacher_logits[scored]
    return F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)


@dataclass
class ScrubParams:
    """SCRUB's settings (keys of the method section)."""

    #: distillation temperature
    temperature: float = 4.0
    #: epochs that start with a max phase on the forget set
    max_epochs: int = 2
    #: weights of the distillation and cross-entropy terms of the min phase
    kd_weight: float = 1.0
    ce_weight: float = 1.0

    def __post_init__(self) -> None:
        check_range("method.temperature", self.temperature, 0.0, lo_open=True)
        check_range("method.max_epochs", self.max_epochs, 0)


@METHODS.register("scrub")
class Scrub(UnlearningMethod):
    params_class = ScrubParams
    params: ScrubParams
    teacher: nn.Module | None = None

    def prepare(self, ctx: UnlearnContext) -> None:
        teacher = copy.deepcopy(ctx.model).to(ctx.device)
        teacher.eval()
        teacher.requires_grad_(False)
        self.teacher = teacher
        return None

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("Scrub.prepare(ctx) must run before phases()")
        if self.teacher.training:  # something called .train() on it: the teacher is always evaluated
            self.teacher.eval()
        return self.teacher(x)

    def max_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return -distill_kl(model(batch.x), self.teacher_logits(batch.x), self.params.temperature, batch.y)

    def min_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch.x)
        loss = self.params.ce_weight * logits_cross_entropy(logits, batch.y)
        if self.params.kd_weight:
            loss = loss + self.params.kd_weight * distill_kl(logits, self.teacher_logits(batch.x),
                                                             self.params.temperature, batch.y)
        return loss

    def is_max_epoch(self, epoch: int) -> bool:
        return epoch < self.params.max_epochs

    def phases(self, epoch: int) -> list[Phase]:
        min_phase = Phase("min", [Objective("retain", "retain", self.min_loss, sam=self.sam)], driver="retain")
        if self.is_max_epoch(epoch):
            max_phase = Phase("max", [Objective("forget", "forget", self.max_loss, sam=self.sam)], driver="forget")
            return [max_phase, min_phase]
        return [min_phase]
