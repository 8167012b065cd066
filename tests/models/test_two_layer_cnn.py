"""The theory network: exact forward formula, coefficients, and learning on signal-noise data."""
from __future__ import annotations

import pytest
import torch

from sharp_unlearn.config import load_config
from sharp_unlearn.data import build_dataset
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models import MODELS


def test_forward_matches_the_formula_for_each_activation():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 16)
    for activation, sigma in (
        ("relu", torch.relu),
        ("relu_q", lambda z: torch.relu(z) ** 3),
        ("linear", lambda z: z),
    ):
        model = MODELS.get("two_layer_cnn")(num_classes=2, input_shape=(3, 16), width=4,
                                            activation=activation, init_std=0.5)
        w = model.weight.detach()  # [classes, m, d]
        expected = torch.stack([
            torch.stack([sum(sigma(w[j, r] @ x[b, p]) for r in range(4) for p in range(3)) / 4
                         for j in range(2)]) for b in range(5)])
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        feats = model.features(x)
        assert feats.shape == (5, model.feature_dim) == (5, 8)
        torch.testing.assert_close(model.head(feats), model(x))


def test_smoothed_relu_is_continuous_with_unit_slope_beyond_kappa():
    model = MODELS.get("two_layer_cnn")(num_classes=2, input_shape=(2, 4), activation="smoothed_relu",
                                        q=3, kappa=0.5)
    act = model.activation
    z = torch.tensor([-1.0, 0.0, 0.25, 0.5 - 1e-6, 0.5, 0.5 + 1e-6, 2.0])
    out = act(z)
    assert out[0] == 0 and out[1] == 0
    assert out[2].item() == pytest.approx(0.25 ** 3 / (3 * 0.25))
    assert out[3].item() == pytest.approx(out[5].item(), abs=1e-5)
    assert (out[6] - out[4]).item() == pytest.approx(1.5, abs=1e-5)


def test_coefficients_are_inner_products():
    model = MODELS.get("two_layer_cnn")(num_classes=2, input_shape=(2, 8), width=3, init_std=1.0)
    mu, noise = torch.randn(8), torch.randn(5, 8)
    w = model.weight.detach()
    torch.testing.assert_close(model.signal_coefficients(mu), w @ mu)
    coeff = model.noise_coefficients(noise)
    assert coeff.shape == (2, 3, 5)
    torch.testing.assert_close(coeff[1, 2, 4], w[1, 2] @ noise[4])
    assert model.noise_coefficients(noise[:, None, :]).shape == (2, 3, 5, 1)
    labels = torch.tensor([0, 1, 1, 0, 1])
    memo = model.noise_memorization(noise, labels)
    torch.testing.assert_close(memo[1], (w[1] @ noise[1]).max())
    torch.testing.assert_close(memo[3], (w[0] @ noise[3]).max())
    learned = model.signal_learning(mu)
    torch.testing.assert_close(learned, torch.stack([(-(w[0] @ mu)).max(), (w[1] @ mu).max()]))


def test_bad_activation_is_a_config_error():
    with pytest.raises(ConfigError, match="activation='tanh'"):
        MODELS.get("two_layer_cnn")(num_classes=2, input_shape=(2, 8), activation="tanh")


def test_learns_the_signal_and_memorizes_training_noise(tmp_path):
    from sharp_unlearn.recipes.pretrain import train_from_scratch
    from sharp_unlearn.stage_checkpoints import load_trained_model

    cfg = load_config([], [
        f"output_dir={tmp_path}", "tracking.enabled=false", "data.name=signal_noise",
        "data.options={d: 400, n: 80, n_val: 50, n_test: 400, signal_norm: 3.0}", "data.label_noise=0.1",
        "data.batch_size=80", "model.name=two_layer_cnn", "model.options={width: 10}",
        "optimizer.lr=1.0", "optimizer.momentum=0", "optimizer.weight_decay=0", "train.schedule=constant",
        "train.epochs=200", "train.eval_every=0", "train.checkpoint_every=0"])
    bundle = build_dataset(cfg.data, cfg.seed)
    mu, noise = bundle.meta["signal"], bundle.meta["noise"]
    labels = torch.as_tensor(bundle.train_targets)
    torch.manual_seed(cfg.seed)  # the initialisation train_from_scratch will use
    from sharp_unlearn.models import build_model

    before = build_model(cfg.model, 2, bundle.input_shape)
    outcome = train_from_scratch(cfg, bundle, quiet=True, use_cache=False)  # 200 full-batch GD steps
    model, _, _ = load_trained_model(outcome.checkpoint, cfg)

    assert outcome.metrics["test_acc"] > 85.0  # chance is 50
    assert outcome.metrics["train_acc"] == 100.0  # the flipped examples are fitted too: memorized
    assert (model.signal_learning(mu) > 10 * before.signal_learning(mu).abs().max()).all()

    memo_before = before.noise_memorization(noise, labels)
    memo_after = model.noise_memorization(noise, labels)
    assert (memo_before != 0).all()  # measurable from the start
    assert memo_after.mean() > 3 * memo_before.mean()
    # growth is specific to the training examples' noise: fresh noise from the same
    # distribution stays near its initial (random) level
    from sharp_unlearn.data.signal_noise import draw_noise

    fresh = torch.from_numpy(draw_noise(80, 400, 1.0, mu.double().numpy(),
                                        __import__("numpy").random.default_rng(99))).float()
    assert memo_after.mean() > 3 * model.noise_memorization(fresh, labels).mean()
    # a mislabeled example can only be fitted through its noise: it is memorized harder
    flipped = torch.as_tensor(bundle.meta["flipped"])
    clean = torch.ones(80, dtype=torch.bool)
    clean[flipped] = False
    assert memo_after[flipped].mean() > memo_after[clean].mean()
    summary = model.coefficient_summary(mu, noise, labels)
    assert summary["noise"] == pytest.approx(float(memo_after.mean()))
