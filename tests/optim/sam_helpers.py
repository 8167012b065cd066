"""Tiny float64 models, data and reference computations shared by the SAM tests
(tests/optim/test_sam.py) and the Trainer's SAM path tests (tests/engine/test_loop.py)."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from sharp_unlearn.optim import SAM, frozen_bn_stats

DTYPE = torch.float64


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)


def tiny_bn_cnn(seed: int = 0, momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).to(DTYPE)


def mlp_data(seed: int = 1, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g)


def img_data(seed: int = 1, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def grad_at(model: nn.Module, x, y, weights: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Gradient of the loss at ``weights`` (default: the model's own), on a copy."""
    clone = copy.deepcopy(model)
    if weights is not None:
        with torch.no_grad():
            for p, w in zip(clone.parameters(), weights, strict=True):
                p.copy_(w)
    return list(torch.autograd.grad(loss_of(clone, x, y), list(clone.parameters())))


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t * t).sum() for t in tensors))


def sam_steps(opt: SAM, model: nn.Module, x, y, steps: int = 1) -> None:
    for _ in range(steps):
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(model):
            loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)


def assert_all_equal(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e), (a - e).abs().max()


def assert_all_close(actual, expected, rtol=1e-10, atol=1e-12) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)
