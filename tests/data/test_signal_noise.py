"""The theory data model: shapes, orthogonality, determinism, recorded label noise."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sharp_unlearn.config import DataConfig
from sharp_unlearn.data import build_dataset
from sharp_unlearn.errors import ConfigError


def make(label_noise=0.0, seed=0, **options):
    opts = {"d": 64, "n": 40, "n_val": 10, "n_test": 30, **options}
    return build_dataset(DataConfig(name="signal_noise", label_noise=label_noise, options=opts), seed)


def test_shapes_signal_patch_and_labels():
    bundle = make(patches=3, signal_norm=2.5)
    assert bundle.input_shape == (3, 64)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (40, 10, 30)
    assert bundle.num_classes == 2
    mu = bundle.meta["signal"]
    assert torch.linalg.norm(mu).item() == pytest.approx(2.5, rel=1e-5)
    x, y, index = bundle.train[7]
    assert x.shape == (3, 64) and int(index) == 7
    sign = 2.0 * int(y) - 1.0
    p = int(bundle.meta["signal_patch"][7])
    torch.testing.assert_close(x[p], sign * mu)
    # the other patches are exactly the recorded noise vectors
    others = [q for q in range(3) if q != p]
    torch.testing.assert_close(x[others], bundle.meta["noise"][7])
    assert bundle.meta["noise"].shape == (40, 2, 64)
    # both classes occur, the signal patch position varies
    assert set(bundle.train_targets.tolist()) == {0, 1}
    assert len(set(bundle.meta["signal_patch"].tolist())) > 1


def test_noise_is_orthogonal_to_signal_with_the_configured_scale():
    bundle = make(d=400, n=200, sigma_p=0.5)
    mu, noise = bundle.meta["signal"].double(), bundle.meta["noise"].double().reshape(-1, 400)
    assert (noise @ mu).abs().max().item() < 1e-4
    # projected Gaussian: E||xi||^2 = sigma_p^2 (d - 1)
    assert (noise.pow(2).sum(1).mean().item() / (0.25 * 399)) == pytest.approx(1.0, abs=0.05)
    # also the test split's noise patches are orthogonal to mu
    test_x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))]).double()
    inner = test_x @ mu / mu.dot(mu)  # +-1 on signal patches, 0 on noise patches
    assert torch.allclose(inner.abs().sum(1), torch.ones(len(test_x), dtype=torch.float64), atol=1e-4)


def test_deterministic_under_the_seed_and_data_seed():
    a, b = make(label_noise=0.1, seed=3), make(label_noise=0.1, seed=3)
    torch.testing.assert_close(a.train.x, b.train.x)
    assert np.array_equal(a.train_targets, b.train_targets)
    assert np.array_equal(a.meta["flipped"], b.meta["flipped"])
    # the run seed picks the flips, not the draw; data_seed picks the draw
    c = make(label_noise=0.1, seed=4)
    torch.testing.assert_close(a.train.x, c.train.x)
    assert not np.array_equal(a.meta["flipped"], c.meta["flipped"])
    d = make(seed=3, data_seed=1)
    assert not torch.allclose(a.train.x, d.train.x)


def test_label_noise_is_recorded_and_keeps_the_true_signal():
    bundle = make(label_noise=0.25, n=80)
    flipped = bundle.meta["flipped"]
    clean = bundle.meta["clean_targets"]
    assert len(flipped) == 20
    changed = np.flatnonzero(bundle.train_targets != clean)
    assert np.array_equal(changed, flipped)
    # a flipped example still carries its *true* label's signal: only memorization fits it
    mu = bundle.meta["signal"]
    for i in flipped[:5]:
        x, y, _ = bundle.train[int(i)]
        p = int(bundle.meta["signal_patch"][i])
        assert torch.sign(x[p] @ mu).item() == 2 * clean[i] - 1 != 2 * int(y) - 1
    assert len(make().meta["flipped"]) == 0


def test_bad_options_name_the_value():
    with pytest.raises(ConfigError, match="patches"):
        make(patches=1)
    with pytest.raises(ConfigError, match="sigma_p"):
        make(sigma_p=-1.0)
    with pytest.raises(ConfigError, match="dimension|expected one of"):
        make(dimension=3)
