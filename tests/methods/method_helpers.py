"""Helpers of the method tests: tiny models and data, method and context builders."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from sharp_unlearn.config import MethodConfig, OptimizerConfig
from sharp_unlearn.data.base import IndexedTensorDataset
from sharp_unlearn.engine.objective import Batch
from sharp_unlearn.methods import METHODS, UnlearnContext
from sharp_unlearn.optim.factory import sam_spec

DTYPE = torch.float64


def tiny_bn_net(seed: int = 0) -> nn.Module:
    """Conv + BatchNorm + linear head on 1x4x4 inputs, 3 classes (float64 for exact comparisons)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 3),
    ).to(DTYPE)


def tiny_data(n: int, seed: int, offset: int = 0) -> IndexedTensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (n,), generator=g)
    return IndexedTensorDataset(x, y, torch.arange(offset, offset + n))


def full_batch(ds: IndexedTensorDataset) -> Batch:
    return Batch(ds.x, ds.y, ds.index)


def make_method(name: str, optimizer: str = "sgd", opt_overrides: dict | None = None, **method_kwargs):
    opt = OptimizerConfig(name=optimizer, **(opt_overrides or {}))
    cfg = MethodConfig(name=name, **method_kwargs)
    return METHODS.get(name)(cfg, opt, sam_spec(opt))


def tiny_context(model: nn.Module, retain=None, forget=None, **extras) -> UnlearnContext:
    retain = retain if retain is not None else tiny_data(40, seed=1)
    forget = forget if forget is not None else tiny_data(12, seed=2, offset=1000)
    return UnlearnContext(model=model, retain=retain, forget=forget, num_classes=3, device=torch.device("cpu"),
                          seed=0, batch_size=16, extras=dict(extras))


def subset(ds, positions) -> Subset:
    return Subset(ds, np.asarray(positions).tolist())
