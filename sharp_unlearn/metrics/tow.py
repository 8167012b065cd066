"""ToW (tug of war, Zhao et al. 2024) against the retrained reference.

``ToW = prod over s in {retain, forget, test} of (1 - |acc_u(s) - acc_r(s)| / 100)``
with accuracies in percent: 1 means indistinguishable from retraining.
The signed companion ``forget_gap`` (points, > 0 = under-forgetting) is
offered alongside, never instead.
"""
from __future__ import annotations

from collections.abc import Mapping

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
