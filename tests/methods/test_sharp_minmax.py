"""Sharp MinMax: complementary masks, SAM-min on retain, SAM-max on forget, one base step."""
from __future__ import annotations

import copy

import pytest
import torch
from method_helpers import full_batch, make_method, tiny_bn_net, tiny_context

from sharp_unlearn.engine.loop import Trainer
from sharp_unlearn.engine.saliency import forget_gradient_saliency
from sharp_unlearn.optim.saliency import mask_fraction, saliency_mask

NO_MOMENTUM = {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "rho": 0.05}


def prepared(optimizer="sam", opt=None, **kw):
    model = tiny_bn_net()
    ctx = tiny_context(model)
    method = make_method("sharp_minmax", optimizer, opt or NO_MOMENTUM, mask_fraction=0.3, alpha=0.6, **kw)
    method.prepare(ctx)
    return model, ctx, method


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_objectives_masks_and_sam_specs():
    model, ctx, method = prepared(rho_max=0.2, lamb_max=0.5, adaptive_max=True)
    [phase] = method.phases(0)
    retain, forget = phase.objectives
    assert (retain.stream, forget.stream, phase.driver_stream) == ("retain", "forget", "retain")
    assert (retain.sam.sign, retain.sam.rho, retain.sam.lamb, retain.sam.adaptive) == ("min", 0.05, 1.0, False)
    assert (forget.sam.sign, forget.sam.rho, forget.sam.lamb, forget.sam.adaptive) == ("max", 0.2, 0.5, True)
    # the mask is the top 30 % of |grad L_F| at the original weights; retain gets its complement
    expected = saliency_mask(forget_gradient_saliency(copy.deepcopy(model), ctx.forget, "cpu", 64), 0.3)
    for name in expected:
        assert torch.equal(forget.mask[name], expected[name])
        assert torch.equal(retain.mask[name] + forget.mask[name], torch.ones_like(expected[name]))
    assert mask_fraction(forget.mask) == pytest.approx(0.3, abs=0.01)
    # loss weights: alpha * CE_R and -(1 - alpha) * CE_F
    batch_r, batch_f = full_batch(ctx.retain), full_batch(ctx.forget)
    model.train()
    ce_r = torch.nn.functional.cross_entropy(model(batch_r.x), batch_r.y)
    ce_f = torch.nn.functional.cross_entropy(model(batch_f.x), batch_f.y)
    torch.testing.assert_close(retain.loss(model, batch_r), 0.6 * ce_r)
    torch.testing.assert_close(forget.loss(model, batch_f), -0.4 * ce_f)


@pytest.mark.parametrize("optimizer", ["sam", "asam"])
def test_each_objective_moves_only_its_side_of_the_mask(optimizer):
    model, ctx, method = prepared(optimizer)
    [phase] = method.phases(0)
    retain, forget = phase.objectives
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    batches = {"retain": [full_batch(ctx.retain)], "forget": [full_batch(ctx.forget)]}
    inside = flat([forget.mask[n] for n, _ in model.named_parameters()]).bool()

    g_forget, _ = trainer.objective_gradient(forget, batches["forget"])
    g_retain, _ = trainer.objective_gradient(retain, batches["retain"])
    assert torch.count_nonzero(flat(g_forget)[~inside]) == 0
    assert torch.count_nonzero(flat(g_retain)[inside]) == 0
    assert torch.count_nonzero(flat(g_forget)[inside]) > 0.9 * int(inside.sum())
    assert torch.count_nonzero(flat(g_retain)[~inside]) > 0.5 * int((~inside).sum())

    # full steps (no momentum, no weight decay): only the objective's own side moves
    start = copy.deepcopy(model.state_dict())
    w0 = flat([p.detach().clone() for p in model.parameters()])
    trainer.step([forget], batches)
    w1 = flat([p.detach() for p in model.parameters()])
    assert torch.equal(w1[~inside], w0[~inside])
    assert not torch.equal(w1[inside], w0[inside])

    model.load_state_dict(start)
    trainer.step([retain], batches)
    w2 = flat([p.detach() for p in model.parameters()])
    assert torch.equal(w2[inside], w0[inside])
    assert not torch.equal(w2[~inside], w0[~inside])

    # both together: one base step with the sum of the two masked gradients
    model.load_state_dict(start)
    g_f, _ = trainer.objective_gradient(forget, batches["forget"])
    g_r, _ = trainer.objective_gradient(retain, batches["retain"])
    model.load_state_dict(start)
    trainer.step(phase.objectives, batches)
    w3 = flat([p.detach() for p in model.parameters()])
    torch.testing.assert_close(w3, w0 - 0.1 * (flat(g_f) + flat(g_r)))


def test_forget_side_is_sharpness_maximizing():
    """The forget gradient is g + s*lamb*(g(w+e) - g) with s = -1 (max), e inside the mask only."""
    model, ctx, method = prepared("sam", lamb_max=1.0)
    forget = method.phases(0)[0].objectives[1]
    batch = full_batch(ctx.forget)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    mask = [forget.mask[n] for n in names]
    model.train()

    def grad_at(weights):
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for p, w in zip(probe.parameters(), weights):
                p.copy_(w)
        for m in probe.modules():  # the engine freezes BN buffers on the second pass; same batch stats
            if isinstance(m, torch.nn.BatchNorm2d):
                m.track_running_stats = False
        return list(torch.autograd.grad(forget.loss(probe, batch), list(probe.parameters())))

    g = grad_at([p.detach() for p in params])
    gm = [gi * mi for gi, mi in zip(g, mask)]
    norm = flat(gm).norm()
    e = [0.05 * gi / norm for gi in gm]
    g2 = grad_at([p.detach() + ei for p, ei in zip(params, e)])
    expected = [(gi - (g2i - gi)) * mi for gi, g2i, mi in zip(g, g2, mask)]
    got, _ = Trainer(model, torch.optim.SGD(params, lr=0.1)).objective_gradient(forget, [batch])
    torch.testing.assert_close(flat(got), flat(expected))


def test_alpha_extremes_and_driver():
    model = tiny_bn_net()
    method = make_method("sharp_minmax", "sam", NO_MOMENTUM, alpha=0.0)
    method.prepare(tiny_context(model))
    [phase] = method.phases(0)
    assert [o.name for o in phase.objectives] == ["forget"] and phase.driver_stream == "forget"
    method = make_method("sharp_minmax", "sam", NO_MOMENTUM, alpha=1.0)
    method.prepare(tiny_context(model))
    assert [o.name for o in method.phases(0)[0].objectives] == ["retain"]


@pytest.mark.parametrize("optimizer,kwargs,tag", [
    ("sam", {}, "sam-min/sam-max"),
    ("asam", {}, "asam-min/sam-max"),
    ("asam", {"adaptive_max": True}, "asam-min/asam-max"),
    ("sgd", {"rho_min": 0.0}, "sgd/sam-max"),
    ("adam", {}, "sam-min/sam-max"),
])
def test_optimizer_tag(optimizer, kwargs, tag):
    assert make_method("sharp_minmax", optimizer, **kwargs).optimizer_tag == tag


def test_phases_before_prepare_is_an_error():
    with pytest.raises(RuntimeError, match="prepare"):
        make_method("sharp_minmax", "sam").phases(0)


def test_masks_are_built_once():
    _, _, method = prepared()
    a, b = method.phases(0)[0], method.phases(1)[0]
    assert a.objectives[0].mask is b.objectives[0].mask and a.objectives[1].mask is b.objectives[1].mask
