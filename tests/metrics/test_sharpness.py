"""Sharpness: power iteration against exact eigenvalues, SAM sharpness against its closed form."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from sharp_unlearn.data import IndexedTensorDataset
from sharp_unlearn.engine.objective import Batch
from sharp_unlearn.metrics import METRICS, EvalContext, EvalOptions
from sharp_unlearn.metrics.sharpness import sam_sharpness, top_hessian_eigenvalue


class Quadratic(nn.Module):
    """L(w) = 1/2 w^T A w: its Hessian is A everywhere."""

    def __init__(self, A: torch.Tensor, w0: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A)
        self.w = nn.Parameter(w0.clone())


def quadratic_loss(model, batch):
    return 0.5 * model.w @ model.A @ model.w


def _spd(n: int, eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


DUMMY = [Batch(torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))]


def test_power_iteration_matches_the_exact_top_eigenvalue_of_a_quadratic():
    A = _spd(12, [7.5, 3.0, 2.0, 1.5, 1.0, 0.8, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    model = Quadratic(A, torch.randn(12, dtype=torch.float64))
    exact = float(torch.linalg.eigvalsh(A)[-1])
    estimate, used = top_hessian_eigenvalue(model, DUMMY, quadratic_loss, iters=100, tol=1e-10)
    assert estimate == pytest.approx(exact, rel=1e-6)
    assert used < 100  # converged, did not run out of iterations


def test_power_iteration_matches_the_exact_hessian_of_a_small_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 2, (40,))
    batches = [Batch(x[:25], y[:25], torch.arange(25)), Batch(x[25:], y[25:], torch.arange(15))]
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss_of(flat):
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = shape.numel()
            params[name] = flat[start:start + size].reshape(shape)
            start += size
        return nn.functional.cross_entropy(functional_call(net, params, (x,)), y)

    H = hessian(loss_of)(flat0)
    eig = torch.linalg.eigvalsh(H)
    exact = float(eig[eig.abs().argmax()])
    estimate, _ = top_hessian_eigenvalue(net, batches, iters=500, tol=1e-9)
    assert estimate == pytest.approx(exact, rel=1e-4)


def test_sam_sharpness_matches_its_closed_form_on_a_quadratic():
    A = _spd(6, [4.0, 2.0, 1.0, 0.5, 0.25, 0.1], seed=1)
    w = torch.randn(6, dtype=torch.float64)
    model = Quadratic(A, w)
    rho = 0.3
    g = A @ w
    unit = g / g.norm()
    # L(w + rho g/|g|) - L(w) = rho |g| + rho^2/2 u^T A u
    expected = float(rho * g.norm() + 0.5 * rho**2 * unit @ A @ unit)
    value, base = sam_sharpness(model, DUMMY, rho, quadratic_loss)
    assert value == pytest.approx(expected, rel=1e-9)
    assert base == pytest.approx(float(0.5 * w @ A @ w), rel=1e-12)
    assert torch.equal(model.w.detach(), w)  # weights restored exactly


def test_batchnorm_is_in_eval_mode_and_the_model_is_left_untouched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    net.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(5):
            net(torch.randn(32, 4) * 3 + 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    batches = [Batch(x, y, torch.arange(20))]
    e1, _ = top_hessian_eigenvalue(net, batches, iters=30)
    e2, _ = top_hessian_eigenvalue(net, [Batch(x[:7], y[:7], torch.arange(7)), Batch(x[7:], y[7:], torch.arange(13))],
                                   iters=30)
    # eval-mode BatchNorm: the loss is per-example, so splitting the batch changes nothing
    assert e1 == pytest.approx(e2, rel=1e-3)
    sam_sharpness(net, batches, 0.05)
    assert net.training  # mode restored
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics and weights unchanged


def test_registered_metric_reports_every_split_and_the_forget_headline():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    data = {s: IndexedTensorDataset(torch.randn(30, 4), torch.randint(0, 3, (30,)))
            for s in ("forget", "retain", "test")}
    ctx = EvalContext(net, data, options=EvalOptions(sharpness_samples=16, hessian_iters=50))
    result = METRICS.get("sharpness").fn(ctx)
    rows = {(v.metric, v.split): v.value for v in result.values}
    assert set(rows) == {(m, s) for m in ("sharpness_hessian", "sharpness_sam") for s in ("forget", "retain", "test")}
    assert result.headline == {"sharpness_hessian": rows[("sharpness_hessian", "forget")],
                               "sharpness_sam": rows[("sharpness_sam", "forget")]}
    assert all(v > 0 for v in rows.values())  # cross-entropy of a linear model is convex
    assert result.details["sharpness"]["splits"]["retain"]["samples"] == 16
