"""Summaries over seeds: the mean and its 95 % Student-t confidence interval.

A module of its own, below ``metrics`` and ``report``: importing the metrics package loads torch,
which ``compare`` and the reproduce tables do not need.
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def t_critical_95(dof: int) -> float:
    """Two-sided 95 % Student-t quantile (scipy comes with scikit-learn, a core dependency)."""
    if dof <= 0:
        return float("nan")
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))


def mean_ci95(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and half-width of the 95 % Student-t confidence interval over ``values`` (NaNs skipped).

    The half-width is ``None`` when there is no interval (fewer than two values), not NaN: an absent
    number prints as an empty cell, is ``null`` in JSON, and fails loudly in arithmetic, where a NaN
    would slip through (``nan or 0.0`` is NaN; ``abs(x) > nan`` is quietly False). The mean of no
    values is NaN.
    """
    values = [float(v) for v in values if v == v]
    if not values:
        return float("nan"), None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, t_critical_95(len(values) - 1) * math.sqrt(var / len(values))


def fmt_mean_ci(mean: float | None, half: float | None, digits: int = 3) -> str:
    """``0.123 ± 0.045`` for a table cell; the mean alone without an interval, empty without a mean."""
    if mean is None or mean != mean:
        return ""
    if half is None or half != half:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def is_significant(mean: float, half: float | None) -> bool:
    """The 95 % CI of the mean paired difference excludes 0 (one seed: no CI, never significant)."""
    return half is not None and half == half and mean == mean and abs(mean) > half
