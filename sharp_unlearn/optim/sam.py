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
class SamSpec:
    """The SAM semantics one objective gets (what the engine's loop and the :class:`SAM` helpers apply)."""

    rho: float
    lamb: float = 1.0
    sign: str = "min"
    adaptive: bool = False

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


def perturbation(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho: float,
                 adaptive: bool, global_sq_norm: torch.Tensor | None = None,
                 eps: float = 1e-12) -> list[torch.Tensor]:
    """``e = rho * T^2 g / ||T g||``.

    ``global_sq_norm`` lets a sharded caller pass ``||T g||^2`` summed over all
    ranks; by default it is computed from ``grads`` here.
    """
    tg = scaled_grads(params, grads, adaptive)
    sq = squared_norm(tg) if global_sq_norm is None else global_sq_norm
    scale = rho / (sq.sqrt() + eps)
    # T^2 g = |w| * (T g) for ASAM; plain g otherwise
    e = torch._foreach_mul(torch._foreach_abs(params), tg) if adaptive else list(tg)
    if not e:
        return []
    return torch._foreach_mul(e, scale.to(e[0].device))


def combine(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor], sign: str,
            lamb: float) -> list[torch.Tensor]:
    """``g + s*lamb*(g(w+e) - g)``; never modifies its inputs.

    Textbook SAM (``s*lamb = 1``) is ``g(w+e)`` itself: the tensors of ``second``
    are returned as they are. Otherwise one fused lerp (new tensors) instead of a
    subtract and an add: the step's hot path on small models is op count.
    """
    coeff = SIGNS[sign] * lamb
    if coeff == 1.0:
        return list(second)
    return torch._foreach_lerp(list(first), list(second), coeff)


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
        # one ||T g|| over every parameter with a gradient, across groups: splitting
        # parameters into groups (e.g. for weight decay) must not change the perturbation
        with_grad = [self._with_grad(group) for group in self.param_groups]
        partial = [squared_norm(scaled_grads(params, grads, group["adaptive"]))
                   for group, (params, grads) in zip(self.param_groups, with_grad) if params]
        global_sq_norm = torch.stack([n.to(partial[0].device) for n in partial]).sum() if partial else None
        for group, (params, grads) in zip(self.param_groups, with_grad):
            if not params:
                continue
            e = perturbation(params, grads, group["rho"], group["adaptive"], global_sq_norm=global_sq_norm)
            for p, g, e_p in zip(params, grads, e):
                state = self.state[p]
                state["old_grad"] = g.clone()
                state["e"] = e_p
            torch._foreach_add_(params, e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if "e" in self.state[p]]
            if not params:
                continue
            e = [self.state[p].pop("e") for p in params]
            torch._foreach_sub_(params, e)  # back to w
            old = [self.state[p].pop("old_grad") for p in params]
            second = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            final = combine(old, second, group["sign"], group["lamb"])
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
