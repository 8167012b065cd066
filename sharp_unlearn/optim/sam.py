"""Sharpness-aware minimization (SAM), its adaptive form (ASAM), min and max.

Two forward-backward passes per step:

1. gradient ``g`` at ``w``; perturb ``w <- w + e`` with
   ``e = rho * T^2 g / ||T g||`` (``T = |w|`` for ASAM, else the identity),
   the norm taken over every parameter that has a gradient (global);
2. gradient ``g(w+e)``; restore ``w``; step the base optimizer with
   ``g + s * lamb * (g(w+e) - g)``, ``s = +1`` for ``min`` (sharpness
   minimization; ``lamb=1`` is textbook SAM) and ``-1`` for ``max``.

The per-tensor arithmetic runs through ``torch._foreach_*`` so a step costs a
handful of fused kernels, not a Python loop per tensor. The same helpers serve
the :class:`SAM` optimizer and the engine's multi-objective path.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sharp_unlearn.config import SAM_SUBSETS

SIGNS = {"min": 1.0, "max": -1.0}


def validate_sam_args(rho: float, sign: str, lamb: float) -> None:
    # `not (x >= 0)` also rejects NaN, which slips through a plain `x < 0`
    if not isinstance(rho, (int, float)) or not (0 <= rho < math.inf):
        raise ValueError(f"SAM rho={rho!r} is invalid; expected a finite number >= 0")
    if sign not in SIGNS:
        raise ValueError(f"SAM sign={sign!r} is invalid; expected 'min' or 'max'")
    if not isinstance(lamb, (int, float)) or not (0 <= lamb < math.inf):
        raise ValueError(f"SAM lamb={lamb!r} is invalid; expected a finite number >= 0")


@dataclass(frozen=True)
class SamVariant:
    """How cheaply SAM runs (the arithmetic: :mod:`sharp_unlearn.optim.sam_variants`): a full step
    every ``every`` steps, reusing the last sharpness direction in between, and a perturbation on a
    ``fraction`` of the entries chosen by ``subset``. The defaults are exact SAM."""

    every: int = 1
    fraction: float = 1.0
    subset: str = "random"

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"SAM every={self.every!r} is invalid; expected an integer >= 1")
        if not isinstance(self.fraction, (int, float)) or not (0 < self.fraction <= 1):
            raise ValueError(f"SAM fraction={self.fraction!r} is invalid; expected a number in (0, 1]")
        if self.subset not in SAM_SUBSETS:
            raise ValueError(f"SAM subset={self.subset!r} is invalid; expected one of {SAM_SUBSETS}")

    @property
    def exact(self) -> bool:
        """Exact SAM: every step full, every entry perturbed (``subset`` then plays no part)."""
        return self.every == 1 and self.fraction == 1.0


@dataclass(frozen=True)
class SamSpec:
    """The SAM semantics one objective gets (what the engine's loop and the :class:`SAM` helpers apply)."""

    rho: float
    lamb: float = 1.0
    sign: str = "min"
    adaptive: bool = False
    variant: SamVariant = SamVariant()

    def __post_init__(self) -> None:
        validate_sam_args(self.rho, self.sign, self.lamb)

    @property
    def tag(self) -> str:
        return f"{'asam' if self.adaptive else 'sam'}-{self.sign}"


def scaled_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                 adaptive: bool) -> list[torch.Tensor]:
    """``T g``: the gradient scaled by ``|w|`` for ASAM (a copy), else ``g`` itself."""
    if not adaptive:
        return list(grads)
    return torch._foreach_mul(torch._foreach_abs(params), grads)


def squared_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squares over all tensors (the caller all-reduces it when sharded)."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors, 2)
    return torch.stack([n.to(norms[0].device) for n in norms]).pow(2).sum()


def perturbation_scale(rho: float, sq_norm: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``rho / ||T g||``, the scalar ``T^2 g`` is multiplied by to give ``e``."""
    return rho / (sq_norm.sqrt() + eps)


def mul_abs_(tensors: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> None:
    """``t *= |w|`` in place, one tensor at a time: ``|w|`` is then a temporary of one
    tensor, not of the whole model (what ``_foreach_abs`` would allocate)."""
    for t, p in zip(tensors, params):
        t.mul_(p.abs())


def perturbation(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho: float,
                 adaptive: bool, global_sq_norm: torch.Tensor | None = None,
                 eps: float = 1e-12) -> list[torch.Tensor]:
    """``e = rho * T^2 g / ||T g||`` (new tensors; see :func:`perturbation_` for one written over ``g``).

    ``global_sq_norm`` lets a sharded caller pass ``||T g||^2`` summed over all
    ranks; by default it is computed from ``grads`` here.
    """
    tg = scaled_grads(params, grads, adaptive)
    sq = squared_norm(tg) if global_sq_norm is None else global_sq_norm
    scale = perturbation_scale(rho, sq, eps)
    # T^2 g = |w| * (T g) for ASAM; plain g otherwise
    e = torch._foreach_mul(torch._foreach_abs(params), tg) if adaptive else list(tg)
    if not e:
        return []
    return torch._foreach_mul(e, scale.to(e[0].device))


def perturbation_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho: float,
                  adaptive: bool, global_sq_norm: torch.Tensor | None = None, eps: float = 1e-12, *,
                  scaled: bool = False) -> list[torch.Tensor]:
    """:func:`perturbation` written over ``grads``, for a caller that no longer needs ``g``
    (textbook SAM: the update is ``g(w+e)`` alone). Returns ``grads``, now holding ``e``,
    bit for bit what :func:`perturbation` returns; allocates nothing parameter-sized.
    ``scaled``: ``grads`` already hold ``T g`` (ASAM; a caller that took the norm first).
    """
    grads = list(grads)
    if adaptive and not scaled:
        mul_abs_(grads, params)  # T g
    sq = squared_norm(grads) if global_sq_norm is None else global_sq_norm
    if adaptive:
        mul_abs_(grads, params)  # T^2 g
    if grads:
        torch._foreach_mul_(grads, perturbation_scale(rho, sq, eps).to(grads[0].device))
    return grads


def _e_of(g: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None, grad_mask: torch.Tensor | None,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor of ``e = ((g * grad_mask) * scale) * mask``, in a new tensor or written over ``out``
    (the same products in the same order as :func:`perturbation` and the masking around it)."""
    if out is None:
        e = g * grad_mask if grad_mask is not None else g * scale
    else:
        e = out.mul_(grad_mask) if grad_mask is not None else out.mul_(scale)
    if grad_mask is not None:
        e.mul_(scale)
    if mask is not None:
        e.mul_(mask)
    return e


@torch.no_grad()
def shift_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scale: torch.Tensor, *,
           subtract: bool = False, masks: Sequence[torch.Tensor] | None = None,
           grad_masks: Sequence[torch.Tensor] | None = None) -> None:
    """``w += e`` (``w -= e`` with ``subtract``) for SAM's ``e = ((g * grad_mask) * scale) * mask``
    (``scale`` from :func:`perturbation_scale`), recomputed one tensor at a time.

    For SAM with ``s*lamb != 1`` the clean ``g`` is kept anyway; recomputing ``e``
    from it (bit for bit) instead of stashing it costs a temporary of one tensor,
    not a second model-sized buffer. Not for ASAM: its ``e`` depends on ``|w|``,
    which the perturbation changes.
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        e = _e_of(g, scale, None if masks is None else masks[i], None if grad_masks is None else grad_masks[i])
        if subtract:
            p.sub_(e)
        else:
            p.add_(e)


@torch.no_grad()
def restore_and_combine_(params: Sequence[torch.Tensor], first: Sequence[torch.Tensor],
                         second: Sequence[torch.Tensor], scale: torch.Tensor, sign: str, lamb: float, *,
                         masks: Sequence[torch.Tensor] | None = None,
                         grad_masks: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """After SAM's second pass with ``e`` recomputed (:func:`shift_`): ``w -= e`` and the
    combination, with no temporaries at all. Tensor by tensor, the combination
    ``g + s*lamb*(g2 - g)`` is written over ``g2`` (``second``, returned), then
    ``e`` over ``g`` (``first``, garbage afterwards) and subtracted from ``w``.
    """
    coeff = SIGNS[sign] * lamb
    for i, (p, g, g2) in enumerate(zip(params, first, second)):
        torch.lerp(g, g2, coeff, out=g2)  # what combine's fused lerp computes, written over g2
        p.sub_(_e_of(g, scale, None if masks is None else masks[i], None if grad_masks is None else grad_masks[i],
                     out=g))
    return list(second)


def is_textbook(sign: str, lamb: float) -> bool:
    """``s*lamb == 1``: the update is ``g(w+e)`` alone, the clean ``g`` is not needed after ``e``."""
    return SIGNS[sign] * lamb == 1.0


def combine(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor], sign: str,
            lamb: float) -> list[torch.Tensor]:
    """``g + s*lamb*(g(w+e) - g)``; never modifies its inputs.

    Textbook SAM (``s*lamb = 1``) is ``g(w+e)`` itself: the tensors of ``second``
    are returned as they are. Otherwise one fused lerp (new tensors) instead of a
    subtract and an add: the step's hot path on small models is op count.
    """
    if is_textbook(sign, lamb):
        return list(second)
    return torch._foreach_lerp(list(first), list(second), SIGNS[sign] * lamb)


def combine_(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor], sign: str,
             lamb: float) -> list[torch.Tensor]:
    """:func:`combine` written over ``first`` (the same fused lerp, so the same bits), for a
    caller that owns ``g``: no new parameter-sized tensors. Textbook SAM returns ``second``."""
    if is_textbook(sign, lamb):
        return list(second)
    first = list(first)
    torch._foreach_lerp_(first, list(second), SIGNS[sign] * lamb)
    return first


# --------------------------------------------------------------- BatchNorm
def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Freeze BatchNorm running statistics for SAM's second pass.

    The perturbed weights are not the model's weights: their activations must
    not leak into the running mean/var. Batch statistics are still used for
    normalisation (train mode). Switching ``track_running_stats`` off (rather
    than zeroing the momentum) also leaves ``num_batches_tracked`` alone, which
    the cumulative average (``momentum=None``) and checkpoints depend on.
    """
    saved = []
    for module in model.modules():
        if _is_batchnorm(module) and module.track_running_stats:
            saved.append(module)
            module.track_running_stats = False
    try:
        yield
    finally:
        for module in saved:
            module.track_running_stats = True


# --------------------------------------------------------------- optimizer
class SAM(torch.optim.Optimizer):
    """SAM / ASAM (min or max) around any torch optimizer class.

    Usage with explicit passes::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    or ``opt.step(closure)`` where ``closure`` re-evaluates the loss and calls
    ``backward``. Param groups may carry their own ``rho``, ``lamb``, ``sign``
    and ``adaptive``; the norm ``||T g||`` is global, over all groups.
    """

    def __init__(self, params: Iterable, base_optimizer: type[torch.optim.Optimizer] | Callable, *,
                 rho: float = 0.05, adaptive: bool = False, sign: str = "min", lamb: float = 1.0,
                 **base_kwargs):
        validate_sam_args(rho, sign, lamb)
        defaults = dict(rho=rho, adaptive=adaptive, sign=sign, lamb=lamb, **base_kwargs)
        super().__init__(params, defaults)
        for group in self.param_groups:
            validate_sam_args(group["rho"], group["sign"], group["lamb"])
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # share groups so schedulers that edit lr reach the base optimizer
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @staticmethod
    def _with_grad(group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = [p for p in group["params"] if p.grad is not None]
        return params, [p.grad for p in params]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Perturb ``w <- w + e``, keeping no more than the restore and the update need.

        With ``zero_grad`` the gradients are dropped here anyway, so they are ours
        to overwrite: textbook SAM (``s*lamb == 1``) writes ``e`` over ``g`` (one
        buffer, ``e``); other ``lamb``/``sign`` keep ``g`` itself for the
        combination and recompute ``e`` from it to restore ``w`` (one buffer, ``g``;
        ASAM also stashes ``e``, which depends on ``|w|``). Without ``zero_grad``
        the caller still holds ``p.grad``: ``e`` is a new tensor and ``g`` a copy.
        """
        # one ||T g|| over every parameter with a gradient, across groups: splitting
        # parameters into groups (e.g. for weight decay) must not change the perturbation
        with_grad = [self._with_grad(group) for group in self.param_groups]
        in_place = [zero_grad and is_textbook(group["sign"], group["lamb"]) for group in self.param_groups]
        partial = []
        for group, (params, grads), overwrite in zip(self.param_groups, with_grad, in_place):
            if not params:
                continue
            if overwrite and group["adaptive"]:
                mul_abs_(grads, params)  # T g written over g: perturbation_ takes it from there
                partial.append(squared_norm(grads))
            else:
                partial.append(squared_norm(scaled_grads(params, grads, group["adaptive"])))
        global_sq_norm = torch.stack([n.to(partial[0].device) for n in partial]).sum() if partial else None
        for group, (params, grads), overwrite in zip(self.param_groups, with_grad, in_place):
            if not params:
                continue
            rho, adaptive = group["rho"], group["adaptive"]
            if overwrite:
                e = perturbation_(params, grads, rho, adaptive, global_sq_norm=global_sq_norm, scaled=adaptive)
                for p, e_p in zip(params, e):
                    self.state[p]["e"] = e_p
                    p.grad = None  # e now lives in the gradient's memory
                torch._foreach_add_(params, e)
                continue
            if is_textbook(group["sign"], group["lamb"]):
                e = perturbation(params, grads, rho, adaptive, global_sq_norm=global_sq_norm)
            else:
                if zero_grad:  # the gradient is dropped below: keep it instead of a copy
                    old = list(grads)
                    for p in params:
                        p.grad = None
                else:
                    old = [g.clone() for g in grads]
                for p, g in zip(params, old):
                    self.state[p]["old_grad"] = g
                if not adaptive:
                    scale = perturbation_scale(rho, global_sq_norm)
                    for p in params:
                        self.state[p]["e_scale"] = scale
                    shift_(params, old, scale)
                    continue
                e = perturbation(params, old, rho, adaptive, global_sq_norm=global_sq_norm)
            for p, e_p in zip(params, e):
                self.state[p]["e"] = e_p
            torch._foreach_add_(params, e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if "e" in self.state[p] or "e_scale" in self.state[p]]
            if not params:
                continue
            states = [self.state[p] for p in params]
            second = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            old = [state.pop("old_grad") for state in states] if "old_grad" in states[0] else None
            if "e_scale" in states[0]:  # back to w with e recomputed from g; the update written over g2
                final = restore_and_combine_(params, old, second, states[0]["e_scale"], group["sign"], group["lamb"])
                for state in states:
                    del state["e_scale"]
            else:
                torch._foreach_sub_(params, [state.pop("e") for state in states])  # back to w
                # textbook SAM keeps no old gradient: its update is g(w+e) alone
                final = second if old is None else combine_(old, second, group["sign"], group["lamb"])
            for p, g in zip(params, final):
                p.grad = g
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor] | None = None):  # type: ignore[override]
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and calls backward()")
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        loss = closure()
        self.second_step()
        return loss

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
