"""The theory data model (Cao et al. 2022; Chen et al. 2023): signal patch + noise patches.

Each example ``x = [x^(1), ..., x^(P)]`` has ``P`` patches of dimension ``d``.
One patch (chosen at random per example, recorded) holds the signal ``y * mu``
with ``y in {-1, +1}``; every other patch holds Gaussian noise
``xi ~ N(0, sigma_p^2 (I - mu mu^T / ||mu||^2))``: Gaussian noise with its
component along ``mu`` removed, so the signal and the noise are orthogonal and
a filter's inner products with ``mu`` and with ``xi_i`` are separate quantities
(signal learning vs noise memorization). Labels are stored as classes 0/1
(class 1 is ``y = +1``). Inputs are shaped ``[patches, d]``.

Label noise (``data.label_noise``) flips the *observed* training label while the
signal patch keeps the true ``y * mu``: exactly the examples a network can only
fit by memorizing their noise.

Options (``data.options``): ``d`` (dimension, 1000), ``n`` (train size, 200),
``n_val`` (200), ``n_test`` (1000), ``patches`` (2), ``signal_norm`` (``||mu||``,
4.0), ``sigma_p`` (1.0), ``data_seed`` (seed of the draw, default 0).

The draw is fixed by ``data_seed`` rather than the run seed, like digits' fixed
split: every run of an experiment (pretrain, retrain reference, memorization
scores) sees the same examples, while the run seed picks the label flips. Pass
``data_seed`` to draw a different data set.

``meta`` carries what the theory measurements need: ``signal`` (``mu``, ``[d]``),
``noise`` (the training noise patches, ``[n, P-1, d]``), ``signal_patch``
(position of the signal patch per training example), ``clean_targets``,
``flipped`` (training positions whose labels were flipped).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sharp_unlearn.data.base import DATASETS, DatasetBundle, IndexedTensorDataset, flip_labels
from sharp_unlearn.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "d": 1000, "n": 200, "n_val": 200, "n_test": 1000, "patches": 2,
    "signal_norm": 4.0, "sigma_p": 1.0, "data_seed": 0,
}


def _options(raw: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"data.options.{unknown[0]} is not an option of signal_noise; "
                          f"expected one of: {', '.join(sorted(DEFAULTS))}")
    opts = {**DEFAULTS, **raw}
    for key in ("d", "n", "n_val", "n_test", "patches", "data_seed"):
        value = opts[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (
                isinstance(value, float) and value.is_integer()):
            raise ConfigError(f"data.options.{key}={value!r} is not an integer")
        opts[key] = int(value)
    for key, low in (("d", 2), ("n", 2), ("n_val", 1), ("n_test", 1), ("patches", 2), ("data_seed", 0)):
        if opts[key] < low:
            raise ConfigError(f"data.options.{key}={opts[key]} is out of range; expected >= {low}")
    for key in ("signal_norm", "sigma_p"):
        try:
            opts[key] = float(opts[key])
        except (TypeError, ValueError):
            raise ConfigError(f"data.options.{key}={opts[key]!r} is not a number") from None
        if not opts[key] > 0:
            raise ConfigError(f"data.options.{key}={opts[key]} is out of range; expected > 0")
    return opts


def draw_signal(d: int, norm: float, rng: np.random.Generator) -> np.ndarray:
    """A random direction scaled to ``norm`` (a random direction, not e_1, so nothing
    in the model can exploit a coordinate-aligned signal)."""
    direction = rng.standard_normal(d)
    return norm * direction / np.linalg.norm(direction)


def draw_noise(count: int, d: int, sigma_p: float, mu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``count`` draws of ``N(0, sigma_p^2 (I - mu mu^T/||mu||^2))``: Gaussian, then projected."""
    z = sigma_p * rng.standard_normal((count, d))
    unit = mu / np.linalg.norm(mu)
    return z - np.outer(z @ unit, unit)


def draw_examples(count: int, opts: dict[str, Any], mu: np.ndarray, rng: np.random.Generator):
    """Examples ``[count, P, d]``, classes 0/1, signal positions, noise ``[count, P-1, d]``."""
    patches, d = opts["patches"], opts["d"]
    labels = rng.integers(0, 2, size=count)
    signs = 2.0 * labels - 1.0
    signal_patch = rng.integers(0, patches, size=count)
    noise = draw_noise(count * (patches - 1), d, opts["sigma_p"], mu, rng).reshape(count, patches - 1, d)
    x = np.empty((count, patches, d))
    for i in range(count):
        others = [p for p in range(patches) if p != signal_patch[i]]
        x[i, signal_patch[i]] = signs[i] * mu
        x[i, others] = noise[i]
    return x.astype(np.float32), labels.astype(np.int64), signal_patch.astype(np.int64), noise.astype(np.float32)


@DATASETS.register("signal_noise")
def build_signal_noise(cfg, seed: int) -> DatasetBundle:
    opts = _options(dict(cfg.options))
    rng = np.random.default_rng(opts["data_seed"])
    mu = draw_signal(opts["d"], opts["signal_norm"], rng)
    # one generator, drawn in a fixed order: the train set does not change when n_test does
    train_x, clean_y, signal_patch, noise = draw_examples(opts["n"], opts, mu, rng)
    val_x, val_y, _, _ = draw_examples(opts["n_val"], opts, mu, np.random.default_rng([opts["data_seed"], 1]))
    test_x, test_y, _, _ = draw_examples(opts["n_test"], opts, mu, np.random.default_rng([opts["data_seed"], 2]))
    train_y, flipped = flip_labels(clean_y, cfg.label_noise, 2, seed)

    train = IndexedTensorDataset(torch.from_numpy(train_x), torch.from_numpy(train_y))
    val = IndexedTensorDataset(torch.from_numpy(val_x), torch.from_numpy(val_y))
    test = IndexedTensorDataset(torch.from_numpy(test_x), torch.from_numpy(test_y))
    return DatasetBundle(
        name="signal_noise", train=train, train_eval=train, val=val, test=test, num_classes=2,
        input_shape=(opts["patches"], opts["d"]), train_targets=train_y,
        meta={
            "signal": torch.from_numpy(mu.astype(np.float32)),
            "noise": torch.from_numpy(noise),
            "signal_patch": signal_patch,
            "clean_targets": clean_y,
            "flipped": flipped,
            "options": opts,
        },
    )
