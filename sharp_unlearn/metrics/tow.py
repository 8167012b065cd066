"""ToW (tug of war, Zhao et al. 2024) against the retrained reference.

``ToW = prod over s in {retain, forget, test} of (1 - |acc_u(s) - acc_r(s)| / 100)``
with accuracies in percent: 1 means indistinguishable from retraining.
The signed companion ``forget_gap`` (points, > 0 = under-forgetting) is
offered alongside, never instead.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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


def t_critical_95(dof: int) -> float:
    """Two-sided 95 % Student-t quantile (scipy comes with scikit-learn, a core dependency)."""
    if dof <= 0:
        return float("nan")
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95 % Student-t confidence interval (NaN width for one value)."""
    values = [float(v) for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, t_critical_95(len(values) - 1) * math.sqrt(var / len(values))
