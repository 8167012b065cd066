"""Sharpness of the loss at the weights: top Hessian eigenvalue and SAM sharpness.

Both use the mean cross-entropy over a seeded sub-sample of each split
(``sharpness_samples`` examples; forget, retain and test, or train and test
without a forget set), with the model in eval mode: BatchNorm uses its running
statistics, so the loss is a fixed function of the weights and the Hessian is
well defined.

- **Top Hessian eigenvalue** by power iteration on Hessian-vector products
  (Pearlmutter's trick via double backward: ``Hv = d/dw <dL/dw, v>``), at most
  ``hessian_iters`` products, stopping when the Rayleigh quotient changes by
  less than ``hessian_tol`` (relative). Power iteration finds the eigenvalue
  of largest magnitude; near a minimum that is the top (positive) one.
- **SAM sharpness** ``max_{||e|| <= rho} L(w + e) - L(w)``, estimated like SAM
  does with one ascent step ``e = rho g / ||g||`` (first-order exact), with
  ``rho = sam_rho`` (0.05 unless set) for every run, so runs trained with
  different radii are measured alike.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.metrics.base import EvalContext, MetricResult, eval_mode, register_metric
from sharp_unlearn.progress import sub_progress

LossFn = Callable[[nn.Module, object], torch.Tensor]


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return params


def _weights(batches: Sequence) -> list[float]:
    sizes = [len(b.y) if hasattr(b, "y") else 1 for b in batches]
    total = float(sum(sizes))
    return [s / total for s in sizes]


def mean_loss(model: nn.Module, batches: Sequence, loss_fn: LossFn = cross_entropy) -> float:
    """Example-weighted mean of ``loss_fn`` over the batches (no graph)."""
    with torch.no_grad():
        return float(sum(w * float(loss_fn(model, b)) for w, b in zip(_weights(batches), batches, strict=True)))


def loss_gradient(model: nn.Module, batches: Sequence, loss_fn: LossFn = cross_entropy) -> list[torch.Tensor]:
    params = _trainable(model)
    total = [torch.zeros_like(p) for p in params]
    for w, batch in zip(_weights(batches), batches, strict=True):
        grads = torch.autograd.grad(loss_fn(model, batch) * w, params, allow_unused=True)
        for t, g in zip(total, grads, strict=True):
            if g is not None:
                t.add_(g)
    return total


def hessian_vector_product(model: nn.Module, batches: Sequence, vector: Sequence[torch.Tensor],
                           loss_fn: LossFn = cross_entropy) -> list[torch.Tensor]:
    """``H v`` of the mean loss over the batches, by double backward (one pass per batch)."""
    params = _trainable(model)
    total = [torch.zeros_like(p) for p in params]
    for w, batch in zip(_weights(batches), batches, strict=True):
        loss = loss_fn(model, batch) * w
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(g, v) for g, v in zip(grads, vector, strict=True) if g is not None]
        if not pairs:
            continue
        dot = sum((g * v).sum() for g, v in pairs)
        hv = torch.autograd.grad(dot, params, allow_unused=True)
        for t, h in zip(total, hv, strict=True):
            if h is not None:
                t.add_(h)
    return total


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def top_hessian_eigenvalue(model: nn.Module, batches: Sequence, loss_fn: LossFn = cross_entropy, *,
                           iters: int = 20, tol: float = 1e-3, seed: int = 0) -> tuple[float, int]:
    """Largest-magnitude Hessian eigenvalue by power iteration; returns (eigenvalue, products used)."""
    if iters < 1:
        raise ValueError(f"iters={iters} must be >= 1")
    params = _trainable(model)
    generator = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    eigenvalue = 0.0
    used = 0
    with eval_mode(model):
        for used in range(1, iters + 1):
            hv = hessian_vector_product(model, batches, v, loss_fn)
            estimate = float(_dot(hv, v))  # Rayleigh quotient, ||v|| = 1
            norm = float(torch.sqrt(_dot(hv, hv)))
            if norm == 0.0:  # v lies in the Hessian's null space: the loss is flat along it
                return 0.0, used
            v = [h / norm for h in hv]
            if used > 1 and abs(estimate - eigenvalue) <= tol * max(abs(eigenvalue), 1e-12):
                eigenvalue = estimate
                break
            eigenvalue = estimate
    return eigenvalue, used


def sam_sharpness(model: nn.Module, batches: Sequence, rho: float, loss_fn: LossFn = cross_entropy
                  ) -> tuple[float, float]:
    """``L(w + rho g/||g||) - L(w)`` and ``L(w)``; the weights are restored afterwards."""
    if rho <= 0:
        raise ValueError(f"rho={rho} must be > 0")
    params = _trainable(model)
    with eval_mode(model):
        base = mean_loss(model, batches, loss_fn)
        grads = loss_gradient(model, batches, loss_fn)
        gnorm = float(torch.sqrt(_dot(grads, grads)))
        if gnorm == 0.0:
            return 0.0, base
        step = [g * (rho / gnorm) for g in grads]
        original = [p.detach().clone() for p in params]  # restore bit for bit, not w + e - e
        with torch.no_grad():
            torch._foreach_add_(params, step)
        try:
            perturbed = mean_loss(model, batches, loss_fn)
        finally:
            with torch.no_grad():
                for p, w in zip(params, original, strict=True):
                    p.copy_(w)
    return perturbed - base, base


def sharpness_splits(ctx: EvalContext) -> list[str]:
    return [s for s in ("forget", "retain", "test", "train") if ctx.has(s)]


@register_metric("sharpness", description="top Hessian eigenvalue (power iteration) and SAM sharpness per split")
def sharpness_metric(ctx: EvalContext) -> MetricResult:
    opts = ctx.options
    result = MetricResult()
    details = {}
    splits = sharpness_splits(ctx)
    for done, split in enumerate(splits):
        sub_progress(done, len(splits), f"sharpness {split}")
        batches = ctx.batches(split, opts.sharpness_samples, "sharpness")
        eig, used = top_hessian_eigenvalue(ctx.model, batches, iters=opts.hessian_iters, tol=opts.hessian_tol,
                                           seed=ctx.seed)
        sam, base = sam_sharpness(ctx.model, batches, opts.sam_rho)
        result.add("sharpness_hessian", split, eig)
        result.add("sharpness_sam", split, sam)
        details[split] = {"hessian": eig, "hvp_products": used, "sam": sam, "loss": base,
                          "samples": sum(len(b.y) for b in batches)}
    headline_split = ctx.first_available("forget", "train", "test")
    if headline_split is not None:
        result.headline["sharpness_hessian"] = details[headline_split]["hessian"]
        result.headline["sharpness_sam"] = details[headline_split]["sam"]
        result.tags["sharpness_headline_split"] = headline_split
    result.details["sharpness"] = {"splits": details, "sam_rho": opts.sam_rho, "samples": opts.sharpness_samples,
                                   "max_iters": opts.hessian_iters, "tol": opts.hessian_tol}
    return result
