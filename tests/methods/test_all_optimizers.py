"""Every method steps with every optimizer (sgd, adam, adamw, sam, asam) through run_stage."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from method_helpers import make_method, tiny_bn_net, tiny_context

from sharp_unlearn.config import OptimizerConfig
from sharp_unlearn.engine.runner import run_stage
from sharp_unlearn.methods import METHODS

UNLEARNING = [name for name in METHODS.names() if name != "retrain"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "sam", "asam"])
@pytest.mark.parametrize("name", UNLEARNING)
def test_one_epoch_with_each_optimizer(small_cfg, name, optimizer):
    model = tiny_bn_net()
    ctx = tiny_context(model, forget_scores=np.arange(12, dtype=float))
    opt = {"lr": 0.01 if optimizer.startswith("adam") or optimizer == "asam" else 0.05}
    method = make_method(name, optimizer, opt, epochs=1, max_epochs=1)
    streams = method.prepare(ctx) or {}
    start = [p.detach().clone() for p in model.parameters()]
    cfg = small_cfg(f"optimizer.name={optimizer}", f"optimizer.lr={opt['lr']}", "data.batch_size=16")
    result = run_stage(model, method.phases, {"retain": ctx.retain, "forget": ctx.forget, **streams}, cfg=cfg,
                       optimizer_cfg=OptimizerConfig(name=optimizer, lr=opt["lr"]), train_cfg=cfg.train,
                       epochs=method.epochs, device=torch.device("cpu"), quiet=True)
    assert len(result.history) == method.epochs
    assert all(math.isfinite(r["train_loss"]) for r in result.history)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(start, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
