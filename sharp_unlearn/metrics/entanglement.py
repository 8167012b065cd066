"""Entanglement of retain and forget in the model's penultimate feature space.

Both scores work on L2-normalised features; lower = the two sets are easier
to tell apart (less entangled).

- **Variance ratio** (Zhao et al. 2024's entanglement score): intra-set over
  inter-set variance,
  ``(mean ||f - mu_R||^2 over R + mean ||f - mu_F||^2 over F) /
  ((||mu_R - mu||^2 + ||mu_F - mu||^2) / 2)`` with ``mu`` the mean of R u F.
- **Wasserstein score**: ``1 - EMD(R, F)`` with uniform weights and the
  Euclidean cost matrix divided by its largest entry (so the EMD is in
  [0, 1]), on at most ``wasserstein_max_per_set`` (1000) seeded samples per set
  (exact EMD by POT's network simplex).

Each is reported globally and class-wise (the unweighted mean over classes
with at least two examples in both sets; per-class values go to details).
"""
from __future__ import annotations

import numpy as np
import torch

from sharp_unlearn.errors import ConfigError, require
from sharp_unlearn.metrics.base import EvalContext, MetricResult, register_metric, sample_positions

_EPS = 1e-12
MIN_PER_CLASS = 2


def l2_normalize(features: np.ndarray | torch.Tensor) -> np.ndarray:
    x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [n, dim]; got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def variance_ratio(retain: np.ndarray, forget: np.ndarray) -> float:
    """Intra-set over inter-set variance (features already normalised)."""
    _check_sets(retain, forget)
    mu_r, mu_f = retain.mean(0), forget.mean(0)
    mu = np.concatenate([retain, forget]).mean(0)
    intra = ((retain - mu_r) ** 2).sum(1).mean() + ((forget - mu_f) ** 2).sum(1).mean()
    inter = 0.5 * (((mu_r - mu) ** 2).sum() + ((mu_f - mu) ** 2).sum())
    return float(intra / max(inter, _EPS))


def wasserstein_score(retain: np.ndarray, forget: np.ndarray, max_per_set: int = 1000, seed: int = 0) -> float:
    """``1 - EMD`` with the Euclidean cost normalised by its maximum (1 = identical sets)."""
    ot = require("ot", "analysis")
    _check_sets(retain, forget)
    a = retain[sample_positions(len(retain), max_per_set, seed, salt=11)]
    b = forget[sample_positions(len(forget), max_per_set, seed, salt=12)]
    cost = ot.dist(a, b, metric="euclidean")
    top = float(cost.max())
    if top <= 0.0:  # every point coincides
        return 1.0
    cost /= top
    wa = np.full(len(a), 1.0 / len(a))
    wb = np.full(len(b), 1.0 / len(b))
    emd = float(ot.emd2(wa, wb, cost, numItermax=2_000_000))
    return 1.0 - emd


def _check_sets(retain: np.ndarray, forget: np.ndarray) -> None:
    if len(retain) == 0 or len(forget) == 0:
        raise ConfigError(f"entanglement needs examples in both sets; got retain={len(retain)}, forget={len(forget)}")
    if retain.shape[1] != forget.shape[1]:
        raise ValueError(f"feature widths differ: {retain.shape[1]} vs {forget.shape[1]}")


def entanglement(retain_features, retain_labels, forget_features, forget_labels, *, max_per_set: int = 1000,
                 seed: int = 0) -> dict:
    """Global and class-wise variance ratio and Wasserstein score (see the module doc)."""
    r, f = l2_normalize(retain_features), l2_normalize(forget_features)
    r_labels, f_labels = np.asarray(retain_labels), np.asarray(forget_labels)
    if len(r_labels) != len(r) or len(f_labels) != len(f):
        raise ValueError("each feature row needs a label")
    out = {"variance": variance_ratio(r, f), "wasserstein": wasserstein_score(r, f, max_per_set, seed),
           "per_class": {}}
    for c in np.intersect1d(np.unique(r_labels), np.unique(f_labels)):
        rc, fc = r[r_labels == c], f[f_labels == c]
        if len(rc) < MIN_PER_CLASS or len(fc) < MIN_PER_CLASS:
            continue
        out["per_class"][int(c)] = {"variance": variance_ratio(rc, fc),
                                    "wasserstein": wasserstein_score(rc, fc, max_per_set, seed + int(c) + 1),
                                    "n_retain": int(len(rc)), "n_forget": int(len(fc))}
    per_class = out["per_class"].values()
    out["variance_classwise"] = float(np.mean([v["variance"] for v in per_class])) if per_class else float("nan")
    out["wasserstein_classwise"] = (float(np.mean([v["wasserstein"] for v in per_class])) if per_class
                                    else float("nan"))
    return out


@register_metric("entanglement", needs=("retain", "forget"), needs_features=True,
                 description="variance ratio and Wasserstein score of retain vs forget features, global and class-wise")
def entanglement_metric(ctx: EvalContext) -> MetricResult:
    retain, forget = ctx.outputs("retain"), ctx.outputs("forget")
    scores = entanglement(ctx.features("retain"), retain.labels, ctx.features("forget"), forget.labels,
                          max_per_set=ctx.options.wasserstein_max_per_set, seed=ctx.seed)
    result = MetricResult()
    split = "retain-forget"
    result.add("entanglement_variance", split, scores["variance"])
    result.add("entanglement_wasserstein", split, scores["wasserstein"])
    result.add("entanglement_variance_classwise", split, scores["variance_classwise"])
    result.add("entanglement_wasserstein_classwise", split, scores["wasserstein_classwise"])
    result.headline.update(entanglement_variance=scores["variance"], entanglement_wasserstein=scores["wasserstein"])
    result.details["entanglement"] = {**scores, "max_per_set": ctx.options.wasserstein_max_per_set}
    return result
