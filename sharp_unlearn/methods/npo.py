"""NPO, negative preference optimization (Zhang et al. 2024): gradient ascent with a bounded loss.

On the forget set NPO minimizes ``(2/beta) * log(1 + (p_theta(a|q) / p_ref(a|q))^beta)``, i.e.
``-(2/beta) * logsigmoid(-beta * (log p_theta - log p_ref))`` averaged over examples, where
``log p`` is the summed log-probability of the example's scored labels (the answer tokens of a
language model, the one label of a classifier) and ``p_ref`` is a frozen copy of the model made
in ``prepare``. Its gradient is gradient ascent's, weighted by how much of the example the model
still remembers relative to the reference: it fades once an example is forgotten, instead of
diverging as plain ascent does.

As in NegGrad+, ``alpha`` weighs a retain cross-entropy term (``alpha = 0``: NPO alone):
``alpha * CE_R + (1 - alpha) * NPO_F``, both objectives with the run's optimizer (AdamW, SAM...).
One epoch is one pass over the retain set (the forget set when ``alpha == 0``), as in NegGrad+.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from sharp_unlearn.config import check_range
from sharp_unlearn.engine.objective import Batch
from sharp_unlearn.losses import sequence_log_likelihood
from sharp_unlearn.methods.base import METHODS, UnlearnContext
from sharp_unlearn.methods.neggrad import NegGradPlus


@dataclass
class NpoParams:
    """NPO's settings (keys of the method section)."""

    #: inverse temperature of the preference loss (small beta approaches gradient ascent)
    beta: float = 0.1

    def __post_init__(self) -> None:
        check_range("method.beta", self.beta, 0.0, lo_open=True)


def example_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each example's labels: sequences ``(B, T, V)`` or classes ``(B, V)``."""
    if logits.dim() == 2:
        logits, labels = logits.unsqueeze(1), labels.unsqueeze(1)
    return sequence_log_likelihood(logits, labels)[0]


def npo_loss(logp: torch.Tensor, logp_reference: torch.Tensor, beta: float) -> torch.Tensor:
    """``-(2/beta) * mean logsigmoid(-beta * (logp - logp_reference))``; ``(2/beta) log 2`` at the reference."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - logp_reference)).mean()


@METHODS.register("npo")
class Npo(NegGradPlus):
    """NegGrad+'s two objectives with NPO's bounded loss on the forget side."""

    phase_name = "npo"
    forget_mean_over = "examples"  # npo_loss is a mean over sequences, not over answer tokens
    params_class = NpoParams
    params: NpoParams
    reference: nn.Module | None = None

    def prepare(self, ctx: UnlearnContext) -> None:
        reference = copy.deepcopy(ctx.model).to(ctx.device)
        reference.eval()
        reference.requires_grad_(False)
        self.reference = reference
        return None

    def forget_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if self.reference is None:
            raise RuntimeError("Npo.prepare(ctx) must run before phases()")
        with torch.no_grad():
            logp_reference = example_log_likelihood(self.reference(batch.x), batch.y)
        return npo_loss(example_log_likelihood(model(batch.x), batch.y), logp_reference, self.params.beta)
