"""finetune, l1_sparse, grad_ascent, retrain: objectives, streams, schedules."""
from __future__ import annotations

import pytest
import torch
from method_helpers import full_batch, make_method, tiny_bn_net, tiny_context
from torch.nn import functional as F

from sharp_unlearn.engine.loop import Trainer


def test_finetune_is_retain_ce_only():
    [phase] = make_method("finetune", "sam", {"rho": 0.1}).phases(0)
    [objective] = phase.objectives
    assert objective.stream == "retain" and objective.sam.rho == 0.1 and objective.mask is None


def test_grad_ascent_minimizes_negative_forget_ce():
    model = tiny_bn_net()
    ctx = tiny_context(model)
    method = make_method("grad_ascent")
    assert method.streams == ("forget",)
    [phase] = method.phases(0)
    [objective] = phase.objectives
    assert objective.stream == "forget" and phase.driver_stream == "forget"
    batch = full_batch(ctx.forget)
    model.train()
    torch.testing.assert_close(objective.loss(model, batch), -F.cross_entropy(model(batch.x), batch.y))


def test_l1_weight_decays_linearly_to_zero():
    method = make_method("l1_sparse", l1_weight=0.01, epochs=4)
    assert [method.l1_weight_at(e) for e in range(4)] == pytest.approx([0.01, 0.0075, 0.005, 0.0025])
    names = [[o.name for o in method.phases(e)[0].objectives] for e in range(4)]
    assert names == [["retain", "l1"]] * 4
    assert [o.name for o in make_method("l1_sparse", l1_weight=0.0).phases(0)[0].objectives] == ["retain"]


def test_l1_gradient_is_weighted_sign_and_not_sam():
    model = tiny_bn_net()
    ctx = tiny_context(model)
    method = make_method("l1_sparse", "sam", l1_weight=0.02, epochs=2)
    retain, l1 = method.phases(1)[0].objectives  # weight 0.01 in the second of two epochs
    assert retain.sam is not None and l1.sam is None
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    grads, loss = trainer.objective_gradient(l1, [full_batch(ctx.retain)] * 2)  # two micro-batches: no double count
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, 0.01 * torch.sign(p.detach()))
    assert loss == pytest.approx(0.01 * sum(float(p.detach().abs().sum()) for p in model.parameters()))


def test_retrain_is_a_from_scratch_marker():
    method = make_method("retrain")
    assert method.from_scratch and method.epochs == 0
    with pytest.raises(RuntimeError, match="from scratch"):
        method.phases(0)
    assert not make_method("neggrad").from_scratch
