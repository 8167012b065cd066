"""Saliency scores: the forget-loss gradient pass a saliency mask ranks.

SalUn (Fan et al. 2024) and Sharp MinMax score each parameter entry by
``| grad_w L_F(w; D_F) |`` at the original weights, over the whole forget set.
``L_F`` is the mean cross-entropy over the forget set; its gradient is
accumulated batch by batch (sum-reduced, divided by the set size, so the
scores do not depend on the batch size) and the absolute value is taken at
the end, as in SalUn's definition. BatchNorm layers run in eval mode, so the
running statistics of the checkpoint are neither used from the batch nor
updated.

Turning scores into masks (and mask files) is :mod:`sharp_unlearn.optim.saliency`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from sharp_unlearn.engine.loop import as_batch, make_loader
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.optim.saliency import Mask


def forget_gradient_saliency(model: nn.Module, forget_dataset: Dataset, device: torch.device | str = "cpu",
                             batch_size: int = 256) -> Mask:
    """``|grad of the mean forget cross-entropy|`` per trainable parameter (same shapes).

    The model is put in eval mode for the pass (BatchNorm uses and keeps its
    running statistics) and restored to its previous mode afterwards; its
    ``.grad`` fields are not touched.
    """
    total = len(forget_dataset)
    if total == 0:
        raise ConfigError("the forget set is empty; a saliency mask needs at least one forget example")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    accumulated = [torch.zeros_like(p) for p in params]
    was_training = model.training
    model.eval()
    try:
        for item in make_loader(forget_dataset, batch_size, shuffle=False):
            batch = as_batch(item).to(device)
            # sum-reduced / |D_F|: the accumulated gradient is that of the mean over the whole set
            loss = cross_entropy(model, batch, reduction="sum") / total
            if not torch.isfinite(loss):
                raise ConfigError("the forget loss is not finite at these weights; the checkpoint is "
                                  "unusable for a saliency mask")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, g in zip(accumulated, grads):
                if g is not None:
                    acc.add_(g)
    finally:
        model.train(was_training)
    return {name: acc.abs_() for (name, _), acc in zip(named, accumulated)}
