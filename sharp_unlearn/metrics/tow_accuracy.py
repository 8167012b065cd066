"""The registered ``accuracy`` and ``tow`` metrics, on the shared predictions.

The formulas live in :mod:`sharp_unlearn.metrics.tow` (ToW, the signed
forget gap); here they are fed from the evaluation context, so accuracy and
ToW cost no extra forward pass over the evaluated model.
"""
from __future__ import annotations

from sharp_unlearn.metrics.base import EvalContext, MetricResult, register_metric
from sharp_unlearn.metrics.tow import forget_gap, tow

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
