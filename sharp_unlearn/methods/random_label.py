"""Random labels (RL, as the baseline of the SalUn paper, Fan et al. 2024).

Two objectives stepped together each step: cross-entropy on the forget set
with every label replaced by a random *different* class, and cross-entropy on
the retain set (which keeps the rest of the model intact). One epoch is one
pass over the retain set, with forget batches cycled alongside.

SalUn's reference code concatenates the relabelled forget set and the retain
set into one data set; here the two means are summed with equal weight, so
the forget term does not shrink with the forget set's share of the data.

The random label is a pure function of (example index, seed): the same
example gets the same wrong label in every epoch, in both SAM passes, and on
resume, whatever the batch composition.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from sharp_unlearn.engine.objective import Batch, Objective, Phase
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.methods.base import METHODS, UnlearnContext, UnlearningMethod

#: 2^31 - 1 (prime): products of two residues stay below 2^62, so the hash never overflows int64
_PRIME = 2_147_483_647


def _mix(h: torch.Tensor, multiplier: int, increment: int) -> torch.Tensor:
    h = (h * multiplier + increment) % _PRIME
    return h ^ (h >> 13)  # xor-shift breaks the linearity in the index (stays below 2^31)


def random_labels(labels: torch.Tensor, index: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """A class different from ``labels``, uniform over the other ``num_classes - 1``,
    determined by ``(index, seed)`` alone (runs on the labels' device)."""
    if num_classes < 2:
        raise ValueError(f"random labels need at least 2 classes, got num_classes={num_classes}")
    seed_term = (int(seed) * 2_654_435_761 + 97) % _PRIME
    h = index.to(torch.int64) % _PRIME
    h = _mix(h, 1_103_515_245, seed_term)
    h = _mix(h, 48_271, 12_345)
    h = _mix(h, 69_621, seed_term ^ 0x5BD1)
    offset = 1 + h % (num_classes - 1)
    return (labels.to(torch.int64) + offset.to(labels.device)) % num_classes


def random_label_loss(num_classes: int, seed: int):
    """Cross-entropy against each example's fixed random wrong label."""

    def loss(model, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch.x), random_labels(batch.y, batch.index, num_classes, seed))

    return loss


@METHODS.register("random_label")
class RandomLabel(UnlearningMethod):
    num_classes: int | None = None
    seed: int = 0

    def prepare(self, ctx: UnlearnContext) -> None:
        self.num_classes = ctx.num_classes
        self.seed = ctx.seed
        return None

    def objectives(self, mask=None) -> list[Objective]:
        if self.num_classes is None:
            raise RuntimeError(f"{type(self).__name__}.prepare(ctx) must run before phases()")
        return [Objective("forget", "forget", random_label_loss(self.num_classes, self.seed), sam=self.sam,
                          mask=mask),
                Objective("retain", "retain", cross_entropy, sam=self.sam, mask=mask)]

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("random_label", self.objectives(), driver="retain")]
