"""SCRUB: max phases only before max_epochs, min phases always; the teacher never changes."""
from __future__ import annotations

import pytest
import torch
from method_helpers import full_batch, make_method, tiny_bn_net, tiny_context

from sharp_unlearn.engine.loop import Trainer
from sharp_unlearn.engine.runner import run_stage
from sharp_unlearn.methods.scrub import distill_kl


def test_alternation_schedule():
    method = make_method("scrub", max_epochs=2, epochs=5)
    names = [[p.name for p in method.phases(e)] for e in range(5)]
    assert names == [["max", "min"], ["max", "min"], ["min"], ["min"], ["min"]]
    max_phase, min_phase = method.phases(0)
    assert max_phase.driver_stream == "forget" and [o.stream for o in max_phase.objectives] == ["forget"]
    assert min_phase.driver_stream == "retain" and [o.stream for o in min_phase.objectives] == ["retain"]
    assert [p.name for p in make_method("scrub", max_epochs=0).phases(0)] == ["min"]


def test_losses_and_sign():
    model = tiny_bn_net()
    ctx = tiny_context(model)
    method = make_method("scrub", temperature=2.0, kd_weight=0.5, ce_weight=2.0)
    method.prepare(ctx)
    max_phase, min_phase = method.phases(0)
    bf, br = full_batch(ctx.forget), full_batch(ctx.retain)
    model.train()  # student in train mode, teacher in eval mode: they differ even at the start
    with torch.no_grad():
        t_f, t_r = method.teacher(bf.x), method.teacher(br.x)
        s_f, s_r = model(bf.x), model(br.x)
    kl_f = distill_kl(s_f, t_f, 2.0)
    assert float(kl_f) > 0
    torch.testing.assert_close(max_phase.objectives[0].loss(model, bf).detach(), -kl_f)
    ce = torch.nn.functional.cross_entropy(s_r, br.y)
    torch.testing.assert_close(min_phase.objectives[0].loss(model, br).detach(),
                               0.5 * distill_kl(s_r, t_r, 2.0) + 2.0 * ce)
    # distill_kl is T^2 * KL(p_t || p_s), checked by hand
    p_t = torch.softmax(t_f / 2.0, 1)
    by_hand = 4.0 * (p_t * (p_t.log() - torch.log_softmax(s_f / 2.0, 1))).sum(1).mean()
    torch.testing.assert_close(kl_f, by_hand)


def test_max_steps_push_the_student_away_from_the_teacher():
    model = tiny_bn_net()
    ctx = tiny_context(model)
    method = make_method("scrub", temperature=1.0)
    method.prepare(ctx)
    max_phase = method.phases(0)[0]
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.2))
    bf = full_batch(ctx.forget)

    def kl():
        model.eval()
        with torch.no_grad():
            return float(distill_kl(model(bf.x), method.teacher(bf.x), 1.0))

    before = kl()
    for _ in range(10):
        trainer.step(max_phase.objectives, {"forget": [bf]})
    assert kl() > before + 0.05


def test_teacher_is_frozen_through_a_run(small_cfg):
    model = tiny_bn_net()
    ctx = tiny_context(model)
    method = make_method("scrub", "sam", {"rho": 0.05}, epochs=3, max_epochs=2)
    method.prepare(ctx)
    teacher = method.teacher
    assert teacher is not model
    teacher_start = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = small_cfg("data.batch_size=16", "optimizer.momentum=0.9")
    seen = []

    def phases(epoch):
        out = method.phases(epoch)
        seen.append((epoch, tuple(p.name for p in out)))
        return out

    result = run_stage(model, phases, {"retain": ctx.retain, "forget": ctx.forget}, cfg=cfg,
                       optimizer_cfg=cfg.optimizer, train_cfg=cfg.train, epochs=method.epochs,
                       device=torch.device("cpu"), quiet=True)
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # BN buffers included
        assert torch.equal(v, teacher_start[k]), k
    assert any(not torch.equal(v, student_start[k]) for k, v in model.state_dict().items())
    # the recorded losses: max and min phases in epochs 1-2, only min in epoch 3
    keys = [sorted(k for k in record if k.startswith("loss_")) for record in result.history]
    assert keys[0] == keys[1] == ["loss_max_forget", "loss_min_retain"]
    assert keys[2] == ["loss_retain"]
    assert {phase_names for epoch, phase_names in seen if epoch == 2} == {("min",)}
    assert result.history[0]["loss_max_forget"] < 0


def test_teacher_used_in_eval_mode_even_if_switched():
    model = tiny_bn_net()
    method = make_method("scrub")
    method.prepare(tiny_context(model))
    method.teacher.train()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    method.teacher_logits(x)
    assert not method.teacher.training


def test_scrub_needs_prepare():
    with pytest.raises(RuntimeError, match="prepare"):
        make_method("scrub").teacher_logits(torch.zeros(1))
