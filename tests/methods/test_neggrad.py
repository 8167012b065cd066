"""NegGrad+: ascend on the forget loss, descend on the retain loss."""
from __future__ import annotations

import torch
from method_helpers import full_batch, make_method, tiny_bn_net, tiny_context, tiny_data
from torch.nn import functional as F

from sharp_unlearn.engine.loop import Trainer


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_gradients_have_the_neggrad_signs():
    model = tiny_bn_net()
    ctx = tiny_context(model)
    method = make_method("neggrad", "sgd", alpha=0.7)
    [phase] = method.phases(0)
    retain, forget = phase.objectives
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    br, bf = full_batch(ctx.retain), full_batch(ctx.forget)
    model.train()
    ref_r = torch.autograd.grad(F.cross_entropy(model(br.x), br.y), list(model.parameters()))
    ref_f = torch.autograd.grad(F.cross_entropy(model(bf.x), bf.y), list(model.parameters()))
    got_r, _ = trainer.objective_gradient(retain, [br])
    got_f, _ = trainer.objective_gradient(forget, [bf])
    torch.testing.assert_close(flat(got_r), 0.7 * flat(ref_r))
    torch.testing.assert_close(flat(got_f), -0.3 * flat(ref_f))


def test_forget_loss_goes_up_and_retain_loss_down():
    # no BatchNorm here: losses are measured exactly as they are optimized
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3)).double()
    retain, forget = tiny_data(60, seed=5), tiny_data(15, seed=6, offset=500)
    retain.y = retain.x.flatten(1)[:, :3].argmax(1)  # a learnable rule on the retain set
    forget.x = forget.x + 2.0  # a separate region of input space, as memorized outliers are
    method = make_method("neggrad", "sgd", alpha=0.5)
    [phase] = method.phases(0)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.3))
    br, bf = full_batch(retain), full_batch(forget)

    def losses():
        model.eval()
        with torch.no_grad():
            return float(F.cross_entropy(model(br.x), br.y)), float(F.cross_entropy(model(bf.x), bf.y))

    r0, f0 = losses()
    for _ in range(40):
        trainer.step(phase.objectives, {"retain": [br], "forget": [bf]})
    r1, f1 = losses()
    assert f1 > f0 + 0.2
    assert r1 < r0 - 0.1


def test_alpha_zero_drives_on_forget_and_one_on_retain():
    [phase] = make_method("neggrad", alpha=0.0).phases(0)
    assert [o.stream for o in phase.objectives] == ["forget"] and phase.driver_stream == "forget"
    [phase] = make_method("neggrad", alpha=1.0).phases(0)
    assert [o.stream for o in phase.objectives] == ["retain"] and phase.driver_stream == "retain"


def test_sam_spec_passed_to_both_objectives():
    [phase] = make_method("neggrad", "asam", {"rho": 0.3, "lamb": 0.5, "sign": "max"}, alpha=0.5).phases(0)
    for objective in phase.objectives:
        assert (objective.sam.rho, objective.sam.lamb, objective.sam.sign, objective.sam.adaptive) == (
            0.3, 0.5, "max", True)
