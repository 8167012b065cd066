"""The training loss every recipe, method and metric shares.

``loss(model, batch) -> scalar tensor`` is the shape of an objective's loss in the training loop
(``engine.objective.Objective``) and of a metric's loss (``metrics.sharpness``); a batch carries the
inputs as ``.x`` and the labels as ``.y``. Methods scale or combine it (``methods.base.scaled``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of the model's logits on ``batch.x`` against ``batch.y``."""
    return F.cross_entropy(model(batch.x), batch.y)
