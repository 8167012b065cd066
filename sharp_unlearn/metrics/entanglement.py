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

Beside these raw scores, the scale of the paper's released code (its
``analysis.py``), so numbers can be set next to the paper's:

- **Bounded variance** (``entanglement_variance_bounded``): the raw global
  ratio divided by :data:`VARIANCE_SCALE` (1300) and clipped to [0, 1]. It is
  derived from the raw ratio, so when the two sets' means coincide (inter-set
  variance 0: nothing separates them) it reads 1, fully entangled; the released
  code returns 0 there.
- **Size-weighted class-wise scores**: the mean over classes weighted by the
  class's size in both sets (``n_retain + n_forget``), so a class with three
  forget examples does not count as much as one with three hundred.
  ``entanglement_variance_classwise_weighted`` (raw ratio scale) and
  ``entanglement_variance_classwise_weighted_bounded`` (that mean / 1300,
  clipped: the paper's class-wise variance) take every class with at least one
  example in each set, as the released code does: a class with a single forget
  example is *kept* (its forget-side intra variance is 0, the ratio is still
  defined), only a class whose two means coincide (inter-set variance 0, ratio
  undefined) is left out. ``entanglement_wasserstein_classwise_weighted`` keeps
  the raw score's rule (at least two examples in each set; a single point's
  EMD is a distance to a cloud, not between two distributions), as the released
  code also does. A score with no eligible class is NaN.
"""
from __future__ import annotations

import numpy as np
import torch

from sharp_unlearn.errors import ConfigError, require
from sharp_unlearn.metrics.base import EvalContext, MetricResult, register_metric, sample_positions

_EPS = 1e-12
MIN_PER_CLASS = 2
#: the released code's divisor for the bounded variance score (its raw ratios on CIFAR reach ~1300)
VARIANCE_SCALE = 1300.0
#: size-weighted class-wise variance: a class needs this many examples in each set (a single forget example counts)
MIN_PER_CLASS_WEIGHTED_VARIANCE = 1


def l2_normalize(features: np.ndarray | torch.Tensor) -> np.ndarray:
    x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [n, dim]; got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def _intra_inter(retain: np.ndarray, forget: np.ndarray) -> tuple[float, float]:
    _check_sets(retain, forget)
    mu_r, mu_f = retain.mean(0), forget.mean(0)
    mu = np.concatenate([retain, forget]).mean(0)
    intra = ((retain - mu_r) ** 2).sum(1).mean() + ((forget - mu_f) ** 2).sum(1).mean()
    inter = 0.5 * (((mu_r - mu) ** 2).sum() + ((mu_f - mu) ** 2).sum())
    return float(intra), float(inter)


def variance_ratio(retain: np.ndarray, forget: np.ndarray) -> float:
    """Intra-set over inter-set variance (features already normalised)."""
    intra, inter = _intra_inter(retain, forget)
    return float(intra / max(inter, _EPS))


def bounded_variance(raw_ratio: float) -> float:
    """The released code's scale: ``raw / 1300`` clipped to [0, 1] (NaN stays NaN: no eligible class)."""
    if raw_ratio != raw_ratio:
        return float("nan")
    return float(min(1.0, max(0.0, raw_ratio / VARIANCE_SCALE)))


def size_weighted_mean(values: list[float], sizes: list[int]) -> float:
    """Mean of ``values`` weighted by ``sizes``; NaN for no values."""
    if not values:
        return float("nan")
    weights = np.asarray(sizes, dtype=np.float64)
    return float(np.dot(np.asarray(values, dtype=np.float64), weights) / weights.sum())


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
    out.update(_size_weighted(r, r_labels, f, f_labels, out["per_class"]))
    out["variance_bounded"] = bounded_variance(out["variance"])
    return out


def _size_weighted(r, r_labels, f, f_labels, per_class: dict) -> dict:
    """The size-weighted class-wise scores (see the module doc for which classes count)."""
    var_values, var_sizes, var_classes = [], [], []
    for c in np.intersect1d(np.unique(r_labels), np.unique(f_labels)):
        rc, fc = r[r_labels == c], f[f_labels == c]
        if min(len(rc), len(fc)) < MIN_PER_CLASS_WEIGHTED_VARIANCE:
            continue
        intra, inter = _intra_inter(rc, fc)
        if inter <= _EPS:  # the two means coincide: the ratio is undefined, not large
            continue
        var_values.append(per_class[int(c)]["variance"] if int(c) in per_class else intra / max(inter, _EPS))
        var_sizes.append(len(rc) + len(fc))
        var_classes.append(int(c))
    weighted_variance = size_weighted_mean(var_values, var_sizes)
    wasserstein_sizes = [v["n_retain"] + v["n_forget"] for v in per_class.values()]
    return {"variance_classwise_weighted": weighted_variance,
            "variance_classwise_weighted_bounded": bounded_variance(weighted_variance),
            "wasserstein_classwise_weighted": size_weighted_mean([v["wasserstein"] for v in per_class.values()],
                                                                 wasserstein_sizes),
            "weighted_classes": {"variance": var_classes, "wasserstein": sorted(per_class)}}


#: the released code's scale, next to the raw scores (metric names are ``entanglement_<name>``)
PAPER_SCALE_SCORES = ("variance_bounded", "variance_classwise_weighted", "variance_classwise_weighted_bounded",
                      "wasserstein_classwise_weighted")


@register_metric("entanglement", needs=("retain", "forget"), needs_features=True,
                 description="variance ratio and Wasserstein score of retain vs forget features, global and "
                             "class-wise, raw and on the paper code's scale (bounded, size-weighted)")
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
    for name in PAPER_SCALE_SCORES:
        result.add(f"entanglement_{name}", split, scores[name])
    # the paper-scale scores are headline values too: the demo and the grid log a run's headline to MLflow
    result.headline.update(entanglement_variance=scores["variance"], entanglement_wasserstein=scores["wasserstein"],
                           **{f"entanglement_{name}": scores[name] for name in PAPER_SCALE_SCORES})
    result.details["entanglement"] = {**scores, "max_per_set": ctx.options.wasserstein_max_per_set}
    return result
