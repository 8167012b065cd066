"""Accuracy on retain, forget, val, test (percent), and per memorization level.

:func:`split_accuracies` measures a model directly (the recipes' per-epoch and final numbers);
the registered ``accuracy`` metric reads the evaluation context's shared predictions, so it costs
no extra forward pass.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Subset

from sharp_unlearn.data.base import DatasetBundle
from sharp_unlearn.engine.loop import predict
from sharp_unlearn.metrics.base import EvalContext, MetricResult, register_metric


def _acc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


def split_accuracies(model: torch.nn.Module, bundle: DatasetBundle, forget_positions: np.ndarray,
                     retain_positions: np.ndarray, device="cpu", batch_size: int = 512,
                     groups: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """``retain_acc``, ``forget_acc``, ``val_acc``, ``test_acc`` (and ``forget_acc_<level>``).

    One pass over the training split serves retain, forget and the groups.
    """
    train = predict(model, bundle.train_eval, batch_size, device)
    correct = (train["logits"].argmax(1) == train["labels"]).float()
    out = {
        "retain_acc": 100.0 * float(correct[torch.as_tensor(retain_positions)].mean()),
        "forget_acc": 100.0 * float(correct[torch.as_tensor(forget_positions)].mean()),
    }
    val = predict(model, bundle.val, batch_size, device)
    test = predict(model, bundle.test, batch_size, device)
    out["val_acc"] = _acc(val["logits"], val["labels"])
    out["test_acc"] = _acc(test["logits"], test["labels"])
    for level, positions in (groups or {}).items():
        if len(positions):
            out[f"forget_acc_{level}"] = 100.0 * float(correct[torch.as_tensor(positions)].mean())
    return out


def subset(dataset, positions: np.ndarray):
    return Subset(dataset, np.asarray(positions).tolist())


ACCURACY_SPLITS = ("retain", "forget", "val", "test", "train")


def percent_correct(outputs) -> float:
    if len(outputs) == 0:
        return float("nan")
    return 100.0 * float(outputs.correct.float().mean())


@register_metric("accuracy", description="top-1 accuracy (percent) on retain, forget, val, test (train without forget)")
def accuracy_metric(ctx: EvalContext) -> MetricResult:
    result = MetricResult()
    for split in ACCURACY_SPLITS:
        if ctx.has(split):
            value = percent_correct(ctx.outputs(split))
            result.add(f"{split}_acc", split, value)
            result.headline[f"{split}_acc"] = value
    return result
