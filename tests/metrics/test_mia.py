"""Membership inference: SVC-MIA efficacy and the calibrated threshold-free attack."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import Subset

from sharp_unlearn.config import DataConfig, ModelConfig
from sharp_unlearn.data import IndexedTensorDataset, build_dataset
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.metrics import METRICS, EvalContext
from sharp_unlearn.metrics.mia import attack_features, logit_confidence, roc_attack, svc_attack, svc_mia
from sharp_unlearn.models import build_model


def test_attack_features_match_hand_computation():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=torch.float64)
    logits = probs.log()
    labels = torch.tensor([0, 1])
    feats = attack_features(logits, labels)
    assert feats["correctness"].ravel().tolist() == [1.0, 0.0]
    np.testing.assert_allclose(feats["confidence"].ravel(), [0.7, 0.3])
    entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    np.testing.assert_allclose(feats["entropy"][0, 0], entropy)
    # Song & Mittal: -(1-p_y) log p_y - sum_{i != y} p_i log(1 - p_i)
    expected = -(0.3 * math.log(0.7)) - 0.2 * math.log(0.8) - 0.1 * math.log(0.9)
    np.testing.assert_allclose(feats["m_entropy"][0, 0], expected)
    expected = -(0.7 * math.log(0.3)) - 0.1 * math.log(0.9) - 0.6 * math.log(0.4)
    np.testing.assert_allclose(feats["m_entropy"][1, 0], expected)
    np.testing.assert_allclose(feats["prob"], probs.numpy())


def test_logit_confidence_is_log_odds_of_the_label():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 2])
    p = torch.softmax(logits.double(), 1)[torch.arange(2), labels]
    np.testing.assert_allclose(logit_confidence(logits, labels), (p / (1 - p)).log().numpy(), rtol=1e-6)
    # stays finite where p_y rounds to 1 in float32
    extreme = logit_confidence(torch.tensor([[60.0, 0.0]]), torch.tensor([0]))
    assert np.isfinite(extreme).all() and extreme[0] == pytest.approx(60.0, abs=1e-6)


def test_roc_attack_on_separable_and_identical_scores():
    rng = np.random.default_rng(0)
    auc, tpr = roc_attack(rng.normal(10, 1, 300), rng.normal(0, 1, 300))
    assert auc == 1.0 and tpr == 1.0
    same = rng.normal(0, 1, 4000)
    auc, tpr = roc_attack(same[:2000], same[2000:])
    assert abs(auc - 0.5) < 0.05 and tpr < 0.05


def test_svc_attack_efficacy_is_the_share_predicted_out():
    rng = np.random.default_rng(0)
    shadow_in = rng.normal(1.0, 0.05, (200, 1))   # members: confident
    shadow_out = rng.normal(0.3, 0.05, (200, 1))  # non-members: not
    out = svc_attack(shadow_in, shadow_out, {"members": rng.normal(1.0, 0.05, (50, 1)),
                                             "outsiders": rng.normal(0.3, 0.05, (50, 1)),
                                             "half": np.concatenate([np.full((25, 1), 1.0), np.full((25, 1), 0.3)])})
    assert out == {"members": 0.0, "outsiders": 1.0, "half": 0.5}


def test_bad_input_errors():
    with pytest.raises(ConfigError, match="non-empty shadow"):
        svc_attack(np.zeros((0, 1)), np.zeros((5, 1)), {})
    outputs = METRICS  # noqa: F841 - the registry is importable
    from sharp_unlearn.metrics.base import SplitOutputs

    so = SplitOutputs(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.arange(3))
    with pytest.raises(ConfigError, match="unknown MIA feature 'loss'.*correctness"):
        svc_mia(so, so, {"forget": so}, features=("loss",))
    with pytest.raises(ConfigError, match="members and non-members"):
        roc_attack(np.zeros(0), np.zeros(3))


# ------------------------------------------------------------------ memorisation
NOISE = 0.5  # per-example pixel noise: held-out digits get harder, so memorised ones stand out


@pytest.fixture(scope="module")
def memorisation():
    """Noisy digits; A trained long on retain+forget (memorises forget), B and B2 on retain only."""
    bundle = build_dataset(DataConfig(name="digits"), 0)
    g = torch.Generator().manual_seed(1)

    def noisy(ds):
        return IndexedTensorDataset(ds.x + NOISE * torch.randn(ds.x.shape, generator=g), ds.y)

    train, test, val = noisy(bundle.train), noisy(bundle.test), noisy(bundle.val)
    perm = np.random.default_rng(0).permutation(len(train))
    retain_pos, forget_pos = perm[:150], perm[150:250]

    def fit(positions, seed):
        torch.manual_seed(seed)
        model = build_model(ModelConfig(name="mlp", options={"hidden": [128]}), 10, (1, 8, 8))
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        x, y = train.x[positions], train.y[positions]
        for _ in range(300):  # full batch, far past 100 % training accuracy
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return model.eval()

    splits = {"retain": Subset(train, retain_pos.tolist()), "forget": Subset(train, forget_pos.tolist()),
              "test": test, "val": val}
    return {"splits": splits, "memorised": fit(np.concatenate([retain_pos, forget_pos]), 0),
            "without": fit(retain_pos, 0), "without_other_seed": fit(retain_pos, 1)}


def _mia(model, splits, reference=None):
    result = METRICS.get("mia").fn(EvalContext(model, splits, reference=reference))
    return {(v.metric, v.split): v.value for v in result.values}, result


def test_svc_mia_flags_a_memorised_set_and_not_an_unseen_one(memorisation):
    splits = memorisation["splits"]
    seen, result = _mia(memorisation["memorised"], splits)
    unseen, _ = _mia(memorisation["without"], splits)
    # memorised: the forget set is predicted "in" far more often than never-seen data
    assert seen[("mia_efficacy", "forget")] <= 0.1
    assert seen[("mia_efficacy", "val")] - seen[("mia_efficacy", "forget")] >= 0.3
    assert result.headline["mia_efficacy"] == seen[("mia_efficacy", "forget")]
    # trained without it: the forget set looks like held-out data
    assert abs(unseen[("mia_efficacy", "forget")] - unseen[("mia_efficacy", "val")]) <= 0.15
    assert unseen[("mia_efficacy", "forget")] - seen[("mia_efficacy", "forget")] >= 0.3
    for feature in ("correctness", "confidence", "entropy", "m_entropy", "prob"):
        assert 0.0 <= seen[(f"mia_efficacy_{feature}", "forget")] <= 1.0
    assert result.tags["mia_attack"] == "global-threshold"


def test_calibrated_attack_separates_memorised_from_retrained(memorisation):
    splits = memorisation["splits"]
    reference = memorisation["without"]
    seen, result = _mia(memorisation["memorised"], splits, reference=reference)
    unseen, _ = _mia(memorisation["without_other_seed"], splits, reference=reference)
    assert result.tags["mia_attack"] == "reference-calibrated"
    assert seen[("mia_auc", "forget")] >= 0.8
    assert seen[("mia_tpr_at_1fpr", "forget")] >= 0.1
    # calibration is what finds the tails: the global threshold attack barely does at 1 % FPR
    global_only, _ = _mia(memorisation["memorised"], splits)
    assert seen[("mia_tpr_at_1fpr", "forget")] >= global_only[("mia_tpr_at_1fpr", "forget")] + 0.1
    assert abs(unseen[("mia_auc", "forget")] - 0.5) <= 0.12
    # the reference scored against itself: every calibrated score is 0, nothing to find
    itself, _ = _mia(reference, splits, reference=reference)
    assert itself[("mia_auc", "forget")] == pytest.approx(0.5)
    assert itself[("mia_tpr_at_1fpr", "forget")] <= 0.01
