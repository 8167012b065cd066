"""Loss landscape: the surface of a quadratic is the quadratic; filter normalisation; files."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from sharp_unlearn.data import IndexedTensorDataset
from sharp_unlearn.engine.objective import Batch
from sharp_unlearn.metrics import METRICS, EvalContext, EvalOptions
from sharp_unlearn.metrics.landscape import filter_normalized_direction, flatness_stats, loss_surface


class Quadratic(nn.Module):
    def __init__(self, A: torch.Tensor, w0: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A)
        self.w = nn.Parameter(w0.clone())


def quadratic_surface_fn(model, batches):
    return float(0.5 * model.w @ model.A @ model.w), float("nan")


def test_the_landscape_of_a_quadratic_is_the_quadratic():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(5, 5, generator=g, dtype=torch.float64)
    A = M @ M.T + torch.eye(5, dtype=torch.float64)
    w = torch.randn(5, generator=g, dtype=torch.float64)
    d1, d2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    model = Quadratic(A, w)
    alphas, betas = np.linspace(-1, 1, 7), np.linspace(-0.5, 2.0, 5)
    loss, _ = loss_surface(model, [], ([d1], [d2]), alphas, betas, quadratic_surface_fn)
    expected = np.array([[float(0.5 * (w + a * d1 + b * d2) @ A @ (w + a * d1 + b * d2)) for b in betas]
                         for a in alphas])
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    assert torch.equal(model.w.detach(), w)  # weights restored


def test_flatness_statistics_of_a_paraboloid():
    axis = np.linspace(-1, 1, 41)
    A, B = np.meshgrid(axis, axis, indexing="ij")
    sharp = 5.0 * (A**2 + B**2)
    flat = 0.05 * (A**2 + B**2)
    s, f = flatness_stats(axis, axis, sharp, 0.0, 0.1), flatness_stats(axis, axis, flat, 0.0, 0.1)
    assert s["spread"] == pytest.approx(10.0) and f["spread"] == pytest.approx(0.1)
    # mean |grad| of c r^2 is 2c E[r]: exactly proportional to the curvature
    assert s["grad"] == pytest.approx(100 * f["grad"], rel=1e-9)
    assert f["basin"] == 1.0  # every point within 0.1 nats
    share = float((sharp <= 0.1).mean())  # the disc r^2 <= 0.02
    assert s["basin"] == pytest.approx(share) and s["basin"] < 0.05


def test_directions_are_filter_normalised_and_skip_biases():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    direction = filter_normalized_direction(net, torch.Generator().manual_seed(1))
    params = list(net.parameters())
    assert len(direction) == len(params)
    for d, p in zip(direction, params, strict=True):
        assert d.shape == p.shape
        if p.dim() <= 1:
            assert torch.count_nonzero(d) == 0
        else:
            torch.testing.assert_close(d.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))


def test_registered_metric_writes_grid_and_figures(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    data = {s: IndexedTensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
            for s in ("retain", "forget", "test")}
    points = 5
    ctx = EvalContext(net, data, options=EvalOptions(landscape_points=points, landscape_samples=20), out_dir=tmp_path)
    before = [p.detach().clone() for p in net.parameters()]
    result = METRICS.get("landscape").fn(ctx)
    for p, w in zip(net.parameters(), before, strict=True):
        assert torch.equal(p.detach(), w)
    rows = {(v.metric, v.split) for v in result.values}
    assert rows == {(f"landscape_{k}", s) for k in ("spread", "grad", "basin") for s in ("forget", "test")}
    grid = pq.read_table(tmp_path / "landscape.parquet").to_pydict()
    assert len(grid["loss"]) == 2 * points * points and set(grid["split"]) == {"forget", "test"}
    centre = [loss for a, b, loss, s in zip(grid["a"], grid["b"], grid["loss"], grid["split"], strict=True)
              if a == 0 and b == 0 and s == "forget"]
    assert centre[0] == pytest.approx(result.details["landscape"]["forget"]["center_loss"], rel=1e-6)
    for split in ("forget", "test"):
        png = tmp_path / "figures" / f"landscape_{split}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_with_an_unrelated_direction_is_rejected():
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="directions have"):
        loss_surface(net, [Batch(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), torch.zeros(1))],
                     ([torch.zeros(2, 2)], [torch.zeros(2, 2)]), np.zeros(1), np.zeros(1))
