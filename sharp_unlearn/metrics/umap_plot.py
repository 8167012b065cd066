"""UMAP of retain vs forget penultimate features (L2-normalised), as PNG figures.

Two figures: all classes (colour = class, dot = retain, cross = forget) and
the largest forget class alone (retain vs forget of that class), where
entanglement is easiest to see. At most ``umap_max_per_set`` seeded points per
set; the embedding is seeded, so the same run gives the same picture.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sharp_unlearn.errors import require
from sharp_unlearn.metrics.base import EvalContext, MetricResult, register_metric, sample_positions
from sharp_unlearn.metrics.entanglement import l2_normalize
from sharp_unlearn.progress import sub_progress


def umap_embedding(features: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """2-D UMAP embedding (cosine geometry via the normalised features' Euclidean distances)."""
    if len(features) < 4:
        raise ValueError(f"UMAP needs at least 4 points; got {len(features)}")
    umap = require("umap", "analysis")
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(features) - 1), min_dist=min_dist,
                        random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(features))


def plot_embedding(embedding: np.ndarray, labels: np.ndarray, is_forget: np.ndarray, title: str, path: Path) -> Path:
    matplotlib = require("matplotlib", "analysis")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    cmap = plt.get_cmap("tab10" if labels.max(initial=0) < 10 else "tab20")
    colors = cmap(labels % cmap.N)
    ax.scatter(embedding[~is_forget, 0], embedding[~is_forget, 1], c=colors[~is_forget], s=6, alpha=0.35,
               marker="o", label="retain")
    ax.scatter(embedding[is_forget, 0], embedding[is_forget, 1], c=colors[is_forget], s=28, alpha=0.9,
               marker="x", label="forget")
    ax.legend(loc="best")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@register_metric("umap", needs=("retain", "forget"), needs_features=True,
                 description="UMAP figures of retain vs forget features (all classes, largest forget class)")
def umap_metric(ctx: EvalContext) -> MetricResult:
    cap = ctx.options.umap_max_per_set
    retain, forget = ctx.outputs("retain"), ctx.outputs("forget")
    r_pos = sample_positions(len(retain), cap, ctx.seed, salt=21)
    f_pos = sample_positions(len(forget), cap, ctx.seed, salt=22)
    feats = l2_normalize(np.concatenate([ctx.features("retain").numpy()[r_pos], ctx.features("forget").numpy()[f_pos]]))
    labels = np.concatenate([retain.labels.numpy()[r_pos], forget.labels.numpy()[f_pos]])
    is_forget = np.concatenate([np.zeros(len(r_pos), bool), np.ones(len(f_pos), bool)])
    result = MetricResult()
    classes, counts = np.unique(forget.labels.numpy(), return_counts=True)
    largest = int(classes[np.argmax(counts)])
    result.details["umap"] = {"retain_points": int(len(r_pos)), "forget_points": int(len(f_pos)),
                              "largest_forget_class": largest}
    path = ctx.artifact_path("figures/umap_all.png")
    if path is None:  # nothing to draw into
        return result
    # two embeddings of a few seconds to minutes each: say which one is running
    sub_progress(0, 2, "umap")
    embedding = umap_embedding(feats, ctx.seed)
    sub_progress(1, 2, "umap")
    result.artifacts.append(plot_embedding(embedding, labels, is_forget,
                                           "UMAP of penultimate features: retain (o) vs forget (x)", path))
    in_class = labels == largest
    if in_class.sum() >= 4 and is_forget[in_class].any():
        class_embedding = umap_embedding(feats[in_class], ctx.seed)
        result.artifacts.append(plot_embedding(
            class_embedding, labels[in_class], is_forget[in_class],
            f"class {largest} (largest forget class): retain (o) vs forget (x)",
            ctx.artifact_path(f"figures/umap_class{largest}.png")))
    sub_progress(2, 2, "umap")
    return result
