"""The training loss every recipe, method and metric shares.

``loss(model, batch) -> scalar tensor`` is the shape of an objective's loss in the training loop
(``engine.objective.Objective``) and of a metric's loss (``metrics.sharpness``); a batch carries the
inputs as ``.x`` and the labels as ``.y``. Methods scale or combine it (``methods.base.scaled``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100


def cross_entropy(model: nn.Module, batch, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the model's logits on ``batch.x`` against ``batch.y`` (mean, or ``reduction``).

    Sequence logits ``(batch, tokens, vocab)`` against ``(batch, tokens)`` labels (a causal LM) are
    flattened: the mean is over the scored tokens, positions labelled ``-100`` are not scored.
    """
    return logits_cross_entropy(model(batch.x), batch.y, reduction)


def logits_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """:func:`cross_entropy` of logits already computed (a loss that also uses them for something else)."""
    if logits.dim() == 3:
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction=reduction)
    return F.cross_entropy(logits, labels, reduction=reduction)


def scored_per_row(labels: torch.Tensor) -> torch.Tensor:
    """Per row of a batch: how many of its labels a mean loss over scored labels averages over
    (labels not ``-100``): 1 for a classifier's row, the answer tokens of a causal LM's sequence.

    A loss that is a mean over the batch's scored labels (:func:`cross_entropy`) split over ranks needs
    each rank's share of them, not of the rows, for the ranks' average to be the full-batch mean.
    """
    return (labels != IGNORE_INDEX).reshape(len(labels), -1).sum(1)


def sequence_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of the scored tokens (labels not ``-100``) and their count."""
    scored = labels != IGNORE_INDEX
    token_logp = torch.log_softmax(logits.float(), dim=-1).gather(
        -1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token_logp * scored).sum(-1), scored.sum(-1)
