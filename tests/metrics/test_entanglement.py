"""Entanglement: variance ratio and Wasserstein score, global and class-wise."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.metrics import METRICS, EvalContext
from sharp_unlearn.metrics.entanglement import entanglement, l2_normalize, variance_ratio, wasserstein_score

DIM = 16


def _clouds(separated: bool, n: int = 300, seed: int = 0, classes: int = 3):
    """Retain and forget clouds per class; separated = forget sits on the opposite side of the sphere."""
    rng = np.random.default_rng(seed)
    retain, forget, r_labels, f_labels = [], [], [], []
    for c in range(classes):
        centre = np.zeros(DIM)
        centre[c] = 10.0
        retain.append(centre + rng.normal(0, 1, (n, DIM)))
        other = -centre if separated else centre
        forget.append(other + rng.normal(0, 1, (n // 3, DIM)))
        r_labels += [c] * n
        f_labels += [c] * (n // 3)
    return np.concatenate(retain), np.array(r_labels), np.concatenate(forget), np.array(f_labels)


def test_separated_clouds_score_lower_than_identical_ones_on_both_scores_global_and_classwise():
    sep = entanglement(*_clouds(separated=True))
    same = entanglement(*_clouds(separated=False))
    assert sep["variance"] < same["variance"] / 10
    assert sep["wasserstein"] < same["wasserstein"] - 0.3
    assert sep["variance_classwise"] < same["variance_classwise"] / 10
    assert sep["wasserstein_classwise"] < same["wasserstein_classwise"] - 0.3
    assert set(sep["per_class"]) == {0, 1, 2}
    assert sep["per_class"][1]["n_retain"] == 300 and sep["per_class"][1]["n_forget"] == 100


def test_scores_on_known_configurations():
    # two single points at opposite poles: no intra variance, EMD = the max cost -> score 0
    a, b = np.array([[1.0, 0.0]]), np.array([[-1.0, 0.0]])
    assert variance_ratio(a, b) == 0.0
    assert wasserstein_score(a, b) == pytest.approx(0.0)
    # the same point set twice: EMD 0 -> score 1
    pts = l2_normalize(np.random.default_rng(0).normal(size=(50, 4)))
    assert wasserstein_score(pts, pts.copy()) == pytest.approx(1.0)
    # half the forget set coincides with retain, half is at the farthest point: EMD = 1/2
    retain = np.array([[1.0, 0.0], [1.0, 0.0]])
    forget = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert wasserstein_score(retain, forget) == pytest.approx(0.5)


def test_features_are_l2_normalised_first():
    retain, r_labels, forget, f_labels = _clouds(separated=True)
    scaled = entanglement(retain * 100.0, r_labels, forget * 0.01, f_labels)
    plain = entanglement(retain, r_labels, forget, f_labels)
    assert scaled["variance"] == pytest.approx(plain["variance"], rel=1e-9)
    assert scaled["wasserstein"] == pytest.approx(plain["wasserstein"], rel=1e-9)


def test_wasserstein_subsamples_at_most_the_cap():
    retain, _, forget, _ = _clouds(separated=False, n=2000, classes=1)
    assert len(retain) == 2000
    capped = wasserstein_score(l2_normalize(retain), l2_normalize(forget), max_per_set=100, seed=0)
    again = wasserstein_score(l2_normalize(retain), l2_normalize(forget), max_per_set=100, seed=0)
    assert capped == again  # seeded
    assert 0.0 <= capped <= 1.0


def test_bad_input_errors():
    with pytest.raises(ConfigError, match="both sets"):
        variance_ratio(np.zeros((0, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="a label"):
        entanglement(np.ones((3, 2)), np.zeros(2), np.ones((3, 2)), np.zeros(3))


class _NoFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x)


def test_registered_metric_needs_a_feature_model():
    from sharp_unlearn.data import IndexedTensorDataset

    ds = IndexedTensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    ctx = EvalContext(_NoFeatures(), {"retain": ds, "forget": ds})
    with pytest.raises(ConfigError, match="no features"):
        METRICS.get("entanglement").fn(ctx)
