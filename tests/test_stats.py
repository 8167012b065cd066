"""stats.mean_ci95: one summary over seeds for report, reproduce and the ablations."""
import math

import pytest

from sharp_unlearn.stats import is_significant, mean_ci95


def test_student_t_interval():
    mean, half = mean_ci95([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9)
    assert half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) * s / sqrt(n)


def test_no_interval_is_none_not_nan():
    assert mean_ci95([0.7]) == (0.7, None)
    mean, half = mean_ci95([])
    assert math.isnan(mean) and half is None


def test_nan_values_are_skipped():
    assert mean_ci95([0.7, float("nan")]) == (0.7, None)
    assert mean_ci95([1.0, float("nan"), 3.0])[0] == pytest.approx(2.0)


def test_significant_only_when_the_interval_excludes_zero():
    assert is_significant(-0.2, 0.1) and not is_significant(0.05, 0.1)
    # no interval (one seed) or a NaN anywhere: never significant
    assert not is_significant(0.2, None) and not is_significant(0.2, float("nan"))
    assert not is_significant(float("nan"), 0.1)
