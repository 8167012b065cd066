"""ToW (tug of war, Zhao et al. 2024) against the retrained reference.

``ToW = prod over s in {retain, forget, test} of (1 - |acc_u(s) - acc_r(s)| / 100)``
with accuracies in percent: 1 means indistinguishable from retraining.
The signed companion ``forget_gap`` (points, > 0 = under-forgetting) is
offered alongside, never instead.

The registered ``tow`` metric computes both from the evaluation context's shared predictions of
the model and of the reference (no extra forward pass).
"""
from __future__ import annotations

from collections.abc import Mapping

from sharp_unlearn.metrics.accuracy import percent_correct
from sharp_unlearn.metrics.base import EvalContext, MetricResult, register_metric

SPLITS = ("retain", "forget", "test")


def tow(unlearned: Mapping[str, float], reference: Mapping[str, float]) -> float:
    value = 1.0
    for split in SPLITS:
        key = f"{split}_acc"
        value *= 1.0 - abs(unlearned[key] - reference[key]) / 100.0
    return value


def forget_gap(unlearned: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """Signed forget-accuracy gap in points: > 0 under-forgets, < 0 over-forgets.

    ToW hides the direction of the gap; this is the signed companion, named
    ``forget_gap`` so it is never mistaken for ToW itself.
    """
    return unlearned["forget_acc"] - reference["forget_acc"]


@register_metric("tow", needs=("retain", "forget", "test"), needs_reference=True,
                 description="tug of war against the retrained reference (and the signed forget gap)")
def tow_metric(ctx: EvalContext) -> MetricResult:
    splits = ("retain", "forget", "test")
    model_acc = {f"{s}_acc": percent_correct(ctx.outputs(s)) for s in splits}
    reference_acc = {f"{s}_acc": percent_correct(ctx.reference_outputs(s)) for s in splits}
    result = MetricResult()
    value, gap = tow(model_acc, reference_acc), forget_gap(model_acc, reference_acc)
    result.add("tow", "all", value)
    result.add("forget_gap", "all", gap)
    result.headline.update(tow=value, forget_gap=gap)
    result.details["tow"] = {"model": model_acc, "reference": reference_acc}
    return result
