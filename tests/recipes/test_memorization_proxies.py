"""Single-run memorization proxies: definitions, the flipped-label check, the cache."""
from __future__ import annotations

import numpy as np
import pytest

from sharp_unlearn.config import load_config
from sharp_unlearn.data import build_dataset
from sharp_unlearn.data.memorization import auroc
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.recipes import memorization_proxies as proxies_module
from sharp_unlearn.recipes.memorization_proxies import compute_proxy_scores, proxies_from_records


def test_proxies_from_records_by_hand():
    # 3 epochs, 2 examples: example 0 learned at once, example 1 only in the last epoch
    prob = np.array([[0.9, 0.1], [0.95, 0.2], [0.99, 0.6]])
    loss = -np.log(prob)
    correct = np.array([[1, 0], [1, 0], [1, 1]], dtype=bool)
    got = proxies_from_records(prob, loss, correct)
    np.testing.assert_allclose(got["confidence"], 1 - prob.mean(axis=0))
    np.testing.assert_allclose(got["loss"], loss.mean(axis=0))
    np.testing.assert_allclose(got["learning_speed"], [0.0, 2 / 3])
    for values in got.values():
        assert values[1] > values[0]  # the late-learned example ranks as more memorized


def test_unknown_proxy_is_a_config_error():
    with pytest.raises(ConfigError, match="'margin' is not known; expected one of: loss, confidence"):
        proxies_from_records(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1), bool), kinds=("margin",))
    with pytest.raises(ConfigError, match="no memorization proxy"):
        proxies_from_records(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1), bool), kinds=())


@pytest.mark.slow
def test_proxies_find_flipped_labels_and_are_cached(tmp_path, monkeypatch):
    cfg = load_config([], [f"output_dir={tmp_path}", "tracking.enabled=false", "data.label_noise=0.05",
                           "model.name=mlp", "model.options={hidden: [64]}", "train.epochs=8"])
    bundle = build_dataset(cfg.data, cfg.seed)
    scores = compute_proxy_scores(cfg, bundle)
    assert set(scores) == {"loss", "confidence", "learning_speed"}
    n = len(bundle.train_targets)
    for kind, values in scores.items():
        assert values.shape == (n,) and np.isfinite(values).all()
        assert auroc(values, bundle.meta["flipped"]) >= 0.9, kind
    assert (scores["learning_speed"] >= 0).all() and (scores["learning_speed"] <= 1).all()

    # the second call reads the per-epoch records from the cache: no training at all
    def no_training(*args, **kwargs):
        raise AssertionError("trained again despite the cache")

    monkeypatch.setattr(proxies_module, "record_training", no_training)
    again = compute_proxy_scores(cfg, bundle, kinds=("learning_speed",))
    np.testing.assert_array_equal(again["learning_speed"], scores["learning_speed"])
    # another recipe is another cache entry
    with pytest.raises(AssertionError, match="trained again"):
        compute_proxy_scores(load_config([], [f"output_dir={tmp_path}", "tracking.enabled=false",
                                               "data.label_noise=0.05", "model.name=mlp", "train.epochs=3"]))
