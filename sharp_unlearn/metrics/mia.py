"""Membership inference: SVC-MIA forget efficacy (SalUn) and a threshold-free calibrated attack.

**SVC-MIA** (as in SalUn and the paper). Shadow "in" = a seeded retain subset
the size of the test set, shadow "out" = the test set (when the retain set is
the smaller one, all of it and a test subset of the same size, so the classes
stay balanced; each capped at ``mia_max_shadow``). One RBF SVC (C=3,
gamma='auto') per attack feature:

- ``correctness``: 1 when the prediction is right;
- ``confidence``: softmax probability of the true label;
- ``entropy``: Shannon entropy of the softmax;
- ``m_entropy``: Song & Mittal's modified entropy
  ``-(1-p_y) log p_y - sum_{i != y} p_i log(1-p_i)``;
- ``prob``: the whole softmax vector.

Efficacy of a target set = the share of its examples the SVC predicts "out"
(a fraction in [0, 1]; higher = the set looks less like training data). The
headline ``mia_efficacy`` uses the **confidence** feature, the one SalUn's
tables report. Besides the whole forget set, the same SVC scores ``val``
(never trained on: the non-member rate a perfectly forgotten set should show)
and the retain examples left out of the shadow set (the member rate), each
on at most ``mia_max_baseline`` seeded examples.

**Threshold-free attack** (``mia_auc``, ``mia_tpr_at_1fpr``). Score per
example = LiRA's logit-scaled confidence ``phi = log p_y - log(1 - p_y)``.
With a retrained reference the score is calibrated per example,
``phi_model(x) - phi_reference(x)`` (difficulty calibration in the spirit of
U-LiRA: the reference is the model that never saw ``x``); without one it is
the raw ``phi``. Members = forget examples, non-members = test examples; AUC
over the two and the TPR at 1 % FPR (the largest TPR at FPR <= 0.01; with a
test set of n examples the FPR is resolved to 1/n). Here higher = more
leakage, 0.5 = forget indistinguishable from test.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.metrics.base import EvalContext, MetricResult, SplitOutputs, register_metric, sample_positions

ATTACK_FEATURES = ("correctness", "confidence", "entropy", "m_entropy", "prob")
HEADLINE_FEATURE = "confidence"
SVC_C = 3.0
SVC_GAMMA = "auto"
_EPS = 1e-30


# ------------------------------------------------------------------ features
def attack_features(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """The five SVC-MIA features per example, each an ``[n, d]`` float64 array."""
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"expected logits [n, classes] and n labels, got {tuple(logits.shape)} and {len(labels)}")
    probs = torch.softmax(logits.double(), 1)
    labels = labels.long()
    p_y = probs.gather(1, labels[:, None]).squeeze(1)
    log_p = torch.log(probs.clamp_min(_EPS))
    log_1mp = torch.log((1.0 - probs).clamp_min(_EPS))
    entropy = -(probs * log_p).sum(1)
    # Song & Mittal (2021): the true class contributes -(1-p_y) log p_y, the others -p_i log(1-p_i)
    others = -(probs * log_1mp)
    others.scatter_(1, labels[:, None], 0.0)
    m_entropy = -(1.0 - p_y) * torch.log(p_y.clamp_min(_EPS)) + others.sum(1)
    correct = (logits.argmax(1) == labels).double()
    return {
        "correctness": correct[:, None].numpy(),
        "confidence": p_y[:, None].numpy(),
        "entropy": entropy[:, None].numpy(),
        "m_entropy": m_entropy[:, None].numpy(),
        "prob": probs.numpy(),
    }


def svc_attack(shadow_in: np.ndarray, shadow_out: np.ndarray, targets: Mapping[str, np.ndarray],
               C: float = SVC_C, gamma: str | float = SVC_GAMMA) -> dict[str, float]:
    """Fit an RBF SVC on shadow in (label 1) vs out (label 0); share of each target predicted out."""
    from sklearn.svm import SVC

    if len(shadow_in) == 0 or len(shadow_out) == 0:
        raise ConfigError(f"SVC-MIA needs non-empty shadow sets; got in={len(shadow_in)} out={len(shadow_out)}")
    x = np.concatenate([shadow_in, shadow_out]).reshape(len(shadow_in) + len(shadow_out), -1)
    y = np.concatenate([np.ones(len(shadow_in)), np.zeros(len(shadow_out))])
    clf = SVC(C=C, gamma=gamma, kernel="rbf")
    clf.fit(x, y)
    out = {}
    for name, feats in targets.items():
        if len(feats) == 0:
            out[name] = float("nan")
            continue
        predicted_in = clf.predict(np.asarray(feats).reshape(len(feats), -1))
        out[name] = float(1.0 - predicted_in.mean())
    return out


def svc_mia(shadow_in: SplitOutputs, shadow_out: SplitOutputs, targets: Mapping[str, SplitOutputs],
            features: tuple[str, ...] = ATTACK_FEATURES) -> dict[str, dict[str, float]]:
    """Efficacy ``{feature: {target: share predicted out}}`` for prepared shadow sets."""
    unknown = [f for f in features if f not in ATTACK_FEATURES]
    if unknown:
        raise ConfigError(f"unknown MIA feature {unknown[0]!r}; expected one of: {', '.join(ATTACK_FEATURES)}")
    f_in = attack_features(shadow_in.logits, shadow_in.labels)
    f_out = attack_features(shadow_out.logits, shadow_out.labels)
    f_targets = {name: attack_features(t.logits, t.labels) for name, t in targets.items()}
    return {feat: svc_attack(f_in[feat], f_out[feat], {n: f[feat] for n, f in f_targets.items()})
            for feat in features}


def shadow_positions(n_retain: int, n_test: int, cap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced shadow sets: retain subset the size of the test set (both capped; see module doc)."""
    size = min(n_retain, n_test, cap)
    return (sample_positions(n_retain, size, seed, salt=1), sample_positions(n_test, size, seed, salt=2))


# ------------------------------------------------------------------ threshold-free attack
def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """``log p_y - log(1 - p_y) = z_y - logsumexp_{j != y} z_j`` (stable in the logits)."""
    z = logits.double()
    z_y = z.gather(1, labels.long()[:, None]).squeeze(1)
    others = z.scatter(1, labels.long()[:, None], float("-inf"))
    return (z_y - torch.logsumexp(others, 1)).numpy()


def roc_attack(member_scores: np.ndarray, nonmember_scores: np.ndarray, max_fpr: float = 0.01) -> tuple[float, float]:
    """AUC and the largest TPR at FPR <= ``max_fpr`` for "higher score = member"."""
    from sklearn.metrics import roc_auc_score, roc_curve

    member_scores = np.asarray(member_scores, dtype=np.float64)
    nonmember_scores = np.asarray(nonmember_scores, dtype=np.float64)
    if len(member_scores) == 0 or len(nonmember_scores) == 0:
        raise ConfigError(f"the MIA attack needs members and non-members; got {len(member_scores)} and "
                          f"{len(nonmember_scores)}")
    y = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    s = np.concatenate([member_scores, nonmember_scores])
    auc = float(roc_auc_score(y, s))
    fpr, tpr, _ = roc_curve(y, s)
    ok = fpr <= max_fpr + 1e-12
    return auc, float(tpr[ok].max()) if ok.any() else 0.0


def calibrated_scores(model_out: SplitOutputs, reference_out: SplitOutputs | None) -> np.ndarray:
    score = logit_confidence(model_out.logits, model_out.labels)
    if reference_out is not None:
        if not torch.equal(model_out.index, reference_out.index):
            raise ValueError("model and reference predictions are not aligned example by example")
        score = score - logit_confidence(reference_out.logits, reference_out.labels)
    return score


# ------------------------------------------------------------------ registered metric
@register_metric("mia", needs=("retain", "forget", "test"),
                 description="SVC-MIA forget efficacy (per feature) and a calibrated AUC / TPR@1%FPR attack")
def mia_metric(ctx: EvalContext) -> MetricResult:
    result = MetricResult()
    retain, forget, test = ctx.outputs("retain"), ctx.outputs("forget"), ctx.outputs("test")
    in_pos, out_pos = shadow_positions(len(retain), len(test), ctx.options.mia_max_shadow, ctx.seed)
    baseline_cap = min(ctx.options.mia_max_baseline, len(out_pos))
    targets = {"forget": forget}
    if ctx.has("val"):
        val = ctx.outputs("val")
        targets["val"] = val.take(sample_positions(len(val), baseline_cap, ctx.seed, salt=4))
    held_out = np.setdiff1d(np.arange(len(retain)), in_pos)
    if len(held_out):
        held_out = held_out[sample_positions(len(held_out), baseline_cap, ctx.seed, salt=3)]
        targets["retain"] = retain.take(held_out)
    efficacy = svc_mia(retain.take(in_pos), test.take(out_pos), targets)
    for feature, by_target in efficacy.items():
        for target, value in by_target.items():
            result.add(f"mia_efficacy_{feature}", target, value)
    for target, value in efficacy[HEADLINE_FEATURE].items():
        result.add("mia_efficacy", target, value)
    result.headline["mia_efficacy"] = efficacy[HEADLINE_FEATURE]["forget"]

    reference_used = ctx.reference is not None
    ref_forget = ctx.reference_outputs("forget") if reference_used else None
    ref_test = ctx.reference_outputs("test") if reference_used else None
    auc, tpr = roc_attack(calibrated_scores(forget, ref_forget), calibrated_scores(test, ref_test))
    result.add("mia_auc", "forget", auc)
    result.add("mia_tpr_at_1fpr", "forget", tpr)
    result.headline.update(mia_auc=auc, mia_tpr_at_1fpr=tpr)
    result.tags["mia_attack"] = "reference-calibrated" if reference_used else "global-threshold"
    result.details["mia"] = {"efficacy": efficacy, "headline_feature": HEADLINE_FEATURE,
                             "shadow_size": int(len(in_pos)), "attack": result.tags["mia_attack"],
                             "svc": {"C": SVC_C, "gamma": SVC_GAMMA, "kernel": "rbf"}}
    return result
