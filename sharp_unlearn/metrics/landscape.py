"""Loss landscape on a 2-D plane through the weights (Li et al. 2018).

Two random Gaussian directions, each **filter-normalised**: every filter (a
slice along dim 0 of a weight with >= 2 dims: a conv output channel, a
linear layer's row) is rescaled to the norm of the matching filter of the
weights, so the plot's scale means the same in every layer and every model.
Biases and BatchNorm parameters (1-D) get a zero direction: their scale is
not comparable to filters', and Li et al. show the plots barely change.

The loss (and accuracy) is evaluated on a ``landscape_points`` x
``landscape_points`` grid over ``[-span, span]^2`` (model in eval mode), on
seeded sub-samples of ``landscape_samples`` examples of the forget and test
splits (train and test without a forget set). Flatness statistics per split:

- ``landscape_spread``: max - min of the loss over the grid;
- ``landscape_grad``: mean over the grid of the finite-difference gradient
  magnitude ``||(dL/da, dL/db)||``;
- ``landscape_basin``: share of grid points whose loss is within
  ``basin_tolerance`` nats of the loss at the weights (1 = flat everywhere).

Artifacts: ``landscape.parquet`` (split, a, b, loss, accuracy) and one PNG per
split with the surface and the contour side by side.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sharp_unlearn.errors import require
from sharp_unlearn.files import atomic_path
from sharp_unlearn.metrics.base import EvalContext, MetricResult, eval_mode, register_metric
from sharp_unlearn.progress import sub_progress

#: surface_fn(model, batches) -> (loss, accuracy in percent or NaN)
SurfaceFn = Callable[[nn.Module, Sequence], tuple[float, float]]


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """A random direction per trainable parameter, filter-normalised (zero for 1-D parameters)."""
    direction = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.dim() <= 1:
            direction.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        d_norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)
        w_norm = p.detach().flatten(1).norm(dim=1)
        shape = (-1,) + (1,) * (p.dim() - 1)
        direction.append(d * (w_norm / d_norm).view(shape))
    return direction


def cross_entropy_and_accuracy(model: nn.Module, batches: Sequence) -> tuple[float, float]:
    from torch.nn import functional as F

    loss, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch.x)
            loss += float(F.cross_entropy(logits, batch.y, reduction="sum"))
            correct += int((logits.argmax(1) == batch.y).sum())
            total += len(batch.y)
    return loss / max(total, 1), 100.0 * correct / max(total, 1)


def loss_surface(model: nn.Module, batches: Sequence, directions: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
                 alphas: np.ndarray, betas: np.ndarray, surface_fn: SurfaceFn = cross_entropy_and_accuracy
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy at ``w + a d1 + b d2`` for every (a, b); arrays of shape [len(alphas), len(betas)].

    The weights are restored exactly afterwards (a copy is kept, so no rounding drift).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    d1, d2 = (list(d) for d in directions)
    if len(d1) != len(params) or len(d2) != len(params):
        raise ValueError(f"directions have {len(d1)}/{len(d2)} tensors; the model has {len(params)} parameters")
    original = [p.detach().clone() for p in params]
    loss = np.zeros((len(alphas), len(betas)))
    acc = np.zeros_like(loss)
    try:
        with eval_mode(model), torch.no_grad():
            for i, a in enumerate(alphas):
                for j, b in enumerate(betas):
                    for p, w, x, y in zip(params, original, d1, d2, strict=True):
                        p.copy_(w + float(a) * x + float(b) * y)
                    loss[i, j], acc[i, j] = surface_fn(model, batches)
                    sub_progress(i * len(betas) + j + 1, len(alphas) * len(betas), "landscape")
    finally:
        with torch.no_grad():
            for p, w in zip(params, original, strict=True):
                p.copy_(w)
    return loss, acc


def flatness_stats(alphas: np.ndarray, betas: np.ndarray, loss: np.ndarray, center_loss: float,
                   basin_tolerance: float) -> dict[str, float]:
    grad_a, grad_b = np.gradient(loss, np.asarray(alphas, float), np.asarray(betas, float))
    return {"spread": float(loss.max() - loss.min()),
            "grad": float(np.sqrt(grad_a ** 2 + grad_b ** 2).mean()),
            "basin": float((np.abs(loss - center_loss) <= basin_tolerance).mean()),
            "center_loss": float(center_loss)}


def plot_surface(alphas: np.ndarray, betas: np.ndarray, loss: np.ndarray, title: str, path: Path) -> Path:
    """Surface and contour side by side (matplotlib, Agg backend: no display needed)."""
    matplotlib = require("matplotlib", "analysis")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    A, B = np.meshgrid(alphas, betas, indexing="ij")
    fig = plt.figure(figsize=(11, 4.5))
    ax3d = fig.add_subplot(1, 2, 1, projection="3d")
    ax3d.plot_surface(A, B, loss, cmap="viridis", linewidth=0, antialiased=True)
    ax3d.set_xlabel("direction 1")
    ax3d.set_ylabel("direction 2")
    ax3d.set_zlabel("loss")
    ax2d = fig.add_subplot(1, 2, 2)
    contour = ax2d.contour(A, B, loss, levels=20, cmap="viridis")
    ax2d.clabel(contour, inline=True, fontsize=7, fmt="%.2f")
    ax2d.plot([0], [0], marker="*", color="red", markersize=10)
    ax2d.set_xlabel("direction 1")
    ax2d.set_ylabel("direction 2")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_grid(grids: dict[str, tuple[np.ndarray, np.ndarray]], alphas: np.ndarray, betas: np.ndarray,
               path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    A, B = np.meshgrid(alphas, betas, indexing="ij")
    columns: dict[str, list] = {"split": [], "a": [], "b": [], "loss": [], "accuracy": []}
    for split, (loss, acc) in grids.items():
        columns["split"] += [split] * loss.size
        columns["a"] += A.ravel().tolist()
        columns["b"] += B.ravel().tolist()
        columns["loss"] += loss.ravel().tolist()
        columns["accuracy"] += acc.ravel().tolist()
    table = pa.table({"split": pa.array(columns["split"], pa.string()),
                      **{k: pa.array(v, pa.float64()) for k, v in columns.items() if k != "split"}})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def landscape_splits(ctx: EvalContext) -> list[str]:
    first = ctx.first_available("forget", "train")
    return [s for s in (first, "test") if s is not None and ctx.has(s)]


@register_metric("landscape", description="2-D loss surface along filter-normalised directions, flatness stats, PNG")
def landscape_metric(ctx: EvalContext) -> MetricResult:
    opts = ctx.options
    generator = torch.Generator().manual_seed(ctx.seed + 2018)
    # the same plane for every split, so the forget and test surfaces are comparable
    directions = (filter_normalized_direction(ctx.model, generator),
                  filter_normalized_direction(ctx.model, generator))
    axis = np.linspace(-opts.landscape_span, opts.landscape_span, opts.landscape_points)
    result = MetricResult()
    grids = {}
    for split in landscape_splits(ctx):
        batches = ctx.batches(split, opts.landscape_samples, "landscape")
        with eval_mode(ctx.model):
            center_loss, _ = cross_entropy_and_accuracy(ctx.model, batches)
        loss, acc = loss_surface(ctx.model, batches, directions, axis, axis)
        grids[split] = (loss, acc)
        stats = flatness_stats(axis, axis, loss, center_loss, opts.basin_tolerance)
        for key in ("spread", "grad", "basin"):
            result.add(f"landscape_{key}", split, stats[key])
        result.details.setdefault("landscape", {})[split] = stats
        png = ctx.artifact_path(f"figures/landscape_{split}.png")
        if png is not None:
            result.artifacts.append(plot_surface(axis, axis, loss, f"loss landscape: {split}", png))
    grid_path = ctx.artifact_path("landscape.parquet")
    if grid_path is not None and grids:
        result.artifacts.append(write_grid(grids, axis, axis, grid_path))
    result.details.setdefault("landscape", {})["grid"] = {"points": opts.landscape_points, "span": opts.landscape_span,
                                                           "samples": opts.landscape_samples,
                                                           "basin_tolerance": opts.basin_tolerance}
    return result
