"""SAM / ASAM (min and max): the optimizer class and ``frozen_bn_stats``.

Reference updates are computed by hand here (autograd on a copy of the model,
explicit formulas), never through ``sharp_unlearn.optim.sam`` helpers, so a
wrong formula in the implementation cannot agree with itself.
"""
from __future__ import annotations

import copy

import pytest
import torch
from optim.sam_helpers import (
    DTYPE,
    assert_all_close,
    assert_all_equal,
    global_norm,
    grad_at,
    img_data,
    loss_of,
    mlp_data,
    sam_steps,
    tiny_bn_cnn,
    tiny_mlp,
    weights,
)
from torch import nn
from torch.nn import functional as F

from sharp_unlearn.engine.objective import SamSpec
from sharp_unlearn.optim import SAM, frozen_bn_stats


# ------------------------------------------------------------------ rho = 0
@pytest.mark.parametrize("base, kwargs", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=1e-3)),
])
@pytest.mark.parametrize("lamb, sign", [(1.0, "min"), (0.3, "max")])
def test_rho_zero_is_exactly_the_base_optimizer(base, kwargs, lamb, sign):
    x, y = img_data()
    sam_model, ref_model = tiny_bn_cnn(), tiny_bn_cnn()
    sam = SAM(sam_model.parameters(), base, rho=0.0, lamb=lamb, sign=sign, **kwargs)
    ref = base(ref_model.parameters(), **kwargs)
    for _ in range(4):
        sam_steps(sam, sam_model, x, y)
        ref.zero_grad()
        loss_of(ref_model, x, y).backward()
        ref.step()
    # bit-for-bit: a zero perturbation must not even round differently
    assert_all_equal(list(sam_model.state_dict().values()), list(ref_model.state_dict().values()))
    assert not torch.equal(weights(sam_model)[0], weights(tiny_bn_cnn())[0])  # it did train


# ------------------------------------------------------------------ textbook SAM
def hand_sam_update(model, x, y, rho, lr, lamb=1.0, sign=+1.0, adaptive=False):
    """w - lr * (g + s*lamb*(g(w+e) - g)) with e = rho T^2 g / ||T g||, by hand."""
    w = weights(model)
    g = grad_at(model, x, y)
    t = [wi.abs() if adaptive else torch.ones_like(wi) for wi in w]
    tg_norm = global_norm([ti * gi for ti, gi in zip(t, g, strict=True)])
    e = [rho * ti * ti * gi / tg_norm for ti, gi in zip(t, g, strict=True)]
    g2 = grad_at(model, x, y, [wi + ei for wi, ei in zip(w, e, strict=True)])
    final = [gi + sign * lamb * (g2i - gi) for gi, g2i in zip(g, g2, strict=True)]
    return [wi - lr * fi for wi, fi in zip(w, final, strict=True)], e


def test_lamb1_min_is_textbook_sam():
    x, y = mlp_data()
    model = tiny_mlp()
    rho, lr = 0.2, 0.3
    # textbook SAM by hand: e = rho g/||g||, w <- w - lr g(w + e)
    w = weights(model)
    g = grad_at(model, x, y)
    norm = global_norm(g)
    e = [rho * gi / norm for gi in g]
    g_pert = grad_at(model, x, y, [wi + ei for wi, ei in zip(w, e, strict=True)])
    expected = [wi - lr * gi for wi, gi in zip(w, g_pert, strict=True)]

    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)
    sam_steps(opt, model, x, y)
    assert_all_close(weights(model), expected)
    # and it is not plain gradient descent (the perturbation mattered)
    plain = [wi - lr * gi for wi, gi in zip(w, g, strict=True)]
    assert max(float((a - b).abs().max()) for a, b in zip(weights(model), plain, strict=True)) > 1e-4


@pytest.mark.parametrize("lamb, sign", [(1.0, "max"), (0.5, "max"), (0.25, "min"), (2.0, "min"), (0.0, "max")])
def test_general_lamb_and_sign(lamb, sign):
    x, y = mlp_data()
    model = tiny_mlp()
    rho, lr = 0.3, 0.2
    s = 1.0 if sign == "min" else -1.0
    expected, _ = hand_sam_update(model, x, y, rho, lr, lamb=lamb, sign=s)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lamb=lamb, sign=sign, lr=lr)
    sam_steps(opt, model, x, y)
    assert_all_close(weights(model), expected)


def test_max_moves_along_g_minus_lamb_times_difference():
    """sign=max: the update direction is g - lamb*(g(w+e) - g), spelled out once more."""
    x, y = mlp_data()
    model = tiny_mlp()
    rho, lr, lamb = 0.5, 1.0, 0.7
    w = weights(model)
    g = grad_at(model, x, y)
    e = [rho * gi / global_norm(g) for gi in g]
    g2 = grad_at(model, x, y, [wi + ei for wi, ei in zip(w, e, strict=True)])
    direction = [gi - lamb * (g2i - gi) for gi, g2i in zip(g, g2, strict=True)]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lamb=lamb, sign="max", lr=lr)
    sam_steps(opt, model, x, y)
    moved = [w0 - w1 for w0, w1 in zip(w, weights(model), strict=True)]  # lr = 1: the step is the direction
    assert_all_close(moved, direction)
    # min and max with the same lamb move differently
    min_model = tiny_mlp()
    sam_steps(SAM(min_model.parameters(), torch.optim.SGD, rho=rho, lamb=lamb, sign="min", lr=lr), min_model, x, y)
    assert not torch.allclose(weights(min_model)[0], weights(model)[0])


# ------------------------------------------------------------------ ASAM
def test_asam_perturbation_matches_formula():
    x, y = mlp_data()
    model = tiny_mlp()
    rho = 0.7
    w = weights(model)
    g = grad_at(model, x, y)
    t = [wi.abs() for wi in w]
    norm = global_norm([ti * gi for ti, gi in zip(t, g, strict=True)])
    e_expected = [rho * ti * ti * gi / norm for ti, gi in zip(t, g, strict=True)]

    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=True, lr=0.1)
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    e_actual = [w1 - w0 for w0, w1 in zip(w, weights(model), strict=True)]
    assert_all_close(e_actual, e_expected)
    # ASAM's perturbation is not SAM's: scaled per entry by |w|^2
    e_sam = [rho * gi / global_norm(g) for gi in g]
    assert not torch.allclose(e_actual[0], e_sam[0])
    # the whole ASAM step
    with frozen_bn_stats(model):
        loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)
    fresh = tiny_mlp()
    expected, _ = hand_sam_update(fresh, x, y, rho, 0.1, adaptive=True)
    assert_all_close(weights(model), expected)


# ------------------------------------------------------------------ groups and the global norm
def test_param_groups_with_different_rho_are_respected():
    x, y = mlp_data()
    model = tiny_mlp()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    w = weights(model)
    g = grad_at(model, x, y)
    norm = global_norm(g)  # one norm over every parameter, whatever its group
    rhos = [0.05] * len(first) + [0.4] * len(second)
    e_expected = [r * gi / norm for r, gi in zip(rhos, g, strict=True)]

    opt = SAM([{"params": first, "rho": 0.05}, {"params": second, "rho": 0.4}], torch.optim.SGD, rho=0.1, lr=0.1)
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    e_actual = [w1 - w0 for w0, w1 in zip(w, weights(model), strict=True)]
    assert_all_close(e_actual, e_expected)


def test_group_split_does_not_change_sam():
    """Splitting parameters into groups with the same settings (as done for weight-decay
    exclusion) must not change the update: the norm is global, not per group."""
    x, y = mlp_data()
    one, two = tiny_mlp(), tiny_mlp()
    sam_steps(SAM(one.parameters(), torch.optim.SGD, rho=0.3, lr=0.2), one, x, y, steps=2)
    groups = [{"params": list(two[0].parameters())}, {"params": list(two[2].parameters())}]
    sam_steps(SAM(groups, torch.optim.SGD, rho=0.3, lr=0.2), two, x, y, steps=2)
    assert_all_close(weights(two), weights(one))


def test_group_options_lamb_sign_adaptive_per_group():
    x, y = mlp_data()
    model = tiny_mlp()
    rho, lr = 0.3, 0.5
    w = weights(model)
    g = grad_at(model, x, y)
    n_first = len(list(model[0].parameters()))
    # group 0: ASAM-max with lamb 0.5; group 1: SAM-min, lamb 1; one global ||T g||
    t = [wi.abs() if i < n_first else torch.ones_like(wi) for i, wi in enumerate(w)]
    norm = global_norm([ti * gi for ti, gi in zip(t, g, strict=True)])
    e = [rho * ti * ti * gi / norm for ti, gi in zip(t, g, strict=True)]
    g2 = grad_at(model, x, y, [wi + ei for wi, ei in zip(w, e, strict=True)])
    coeff = [-0.5 if i < n_first else 1.0 for i in range(len(w))]
    expected = [wi - lr * (gi + c * (g2i - gi)) for wi, gi, g2i, c in zip(w, g, g2, coeff, strict=True)]
    opt = SAM([{"params": list(model[0].parameters()), "adaptive": True, "sign": "max", "lamb": 0.5},
               {"params": list(model[2].parameters())}], torch.optim.SGD, rho=rho, lr=lr)
    sam_steps(opt, model, x, y)
    assert_all_close(weights(model), expected)


def test_norm_skips_parameters_without_gradient():
    """A parameter with no gradient (unused, frozen) neither moves nor counts in the norm."""
    x, y = mlp_data()
    model = tiny_mlp()
    unused = nn.Parameter(torch.full((7,), 3.0, dtype=DTYPE))
    w = weights(model)
    g = grad_at(model, x, y)
    e_expected = [0.2 * gi / global_norm(g) for gi in g]
    opt = SAM(list(model.parameters()) + [unused], torch.optim.SGD, rho=0.2, lr=0.1)
    loss_of(model, x, y).backward()
    assert unused.grad is None
    opt.first_step(zero_grad=True)
    assert_all_close([w1 - w0 for w0, w1 in zip(w, weights(model), strict=True)], e_expected)
    assert torch.equal(unused.detach(), torch.full((7,), 3.0, dtype=DTYPE))
    # the perturbation has norm rho exactly
    torch.testing.assert_close(global_norm(e_expected), torch.tensor(0.2, dtype=DTYPE))
    with frozen_bn_stats(model):
        loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)
    assert torch.equal(unused.detach(), torch.full((7,), 3.0, dtype=DTYPE))


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("kwargs, needle", [
    (dict(rho=-0.1), "rho=-0.1"),
    (dict(rho=float("nan")), "rho=nan"),
    (dict(sign="down"), "sign='down'"),
    (dict(lamb=-1.0), "lamb=-1.0"),
])
def test_invalid_arguments_raise_naming_the_value(kwargs, needle):
    with pytest.raises(ValueError) as info:
        SAM(tiny_mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)
    assert needle in str(info.value)


def test_invalid_group_value_raises():
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"rho=-2"):
        SAM([{"params": list(model[0].parameters()), "rho": -2}, {"params": list(model[2].parameters())}],
            torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"sign='up'"):
        SamSpec(rho=0.1, sign="up")


# ------------------------------------------------------------------ step(closure)
def test_step_with_closure_equals_explicit_passes():
    x, y = img_data()
    explicit, closured = tiny_bn_cnn(), tiny_bn_cnn()
    opt_a = SAM(explicit.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    opt_b = SAM(closured.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    sam_steps(opt_a, explicit, x, y, steps=3)

    def closure():
        with frozen_bn_stats(closured):
            loss = loss_of(closured, x, y)
            loss.backward()
        return loss

    for _ in range(3):
        loss_of(closured, x, y).backward()
        opt_b.step(closure)
        opt_b.zero_grad()
    assert_all_close(list(closured.state_dict().values()), list(explicit.state_dict().values()))
    with pytest.raises(ValueError, match="closure"):
        opt_b.step()


# ------------------------------------------------------------------ BatchNorm
@pytest.mark.parametrize("momentum", [0.1, None])
def test_frozen_bn_stats_leaves_running_statistics_alone(momentum):
    x, y = img_data()
    model = tiny_bn_cnn(momentum=momentum)
    model.train()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    bn = model[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}  # running_mean/var, num_batches_tracked
    with frozen_bn_stats(model):
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
    after = bn.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    # the second pass still normalises with the batch statistics (train mode), not the running ones
    ref = copy.deepcopy(model)
    ref.train()
    torch.testing.assert_close(out, ref(x))
    opt.second_step(zero_grad=True)
    # outside the context the statistics update again, with the original settings
    assert bn.momentum == momentum
    model(x)
    assert not torch.equal(bn.running_mean, before["running_mean"])
    assert int(bn.num_batches_tracked) == int(before["num_batches_tracked"]) + 1


def test_frozen_bn_stats_restores_on_error():
    model = tiny_bn_cnn()
    with pytest.raises(RuntimeError):
        with frozen_bn_stats(model):
            raise RuntimeError("boom")
    bn = model[1]
    mean = bn.running_mean.clone()
    model.train()
    model(img_data()[0])
    assert not torch.equal(bn.running_mean, mean)
