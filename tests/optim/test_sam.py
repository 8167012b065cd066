"""SAM / ASAM (min and max): the optimizer class and the engine's SAM path.

Reference updates are computed by hand here (autograd on a copy of the model,
explicit formulas), never through ``sharp_unlearn.optim.sam`` helpers, so a
wrong formula in the implementation cannot agree with itself.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sharp_unlearn.engine.loop import Trainer
from sharp_unlearn.engine.objective import Batch, Objective, SamSpec
from sharp_unlearn.optim import SAM, frozen_bn_stats

DTYPE = torch.float64


# ------------------------------------------------------------------ fixtures
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


def test_trainer_sam_step_updates_bn_statistics_once():
    """After one SAM step the running statistics equal those of a single forward at w."""
    x, y = img_data()
    model = tiny_bn_cnn()
    once = copy.deepcopy(model)
    once.train()
    with torch.no_grad():
        once(x)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    objective = Objective("ce", "train", lambda m, b: F.cross_entropy(m(b.x), b.y), sam=SamSpec(rho=0.5))
    trainer.step([objective], {"train": [Batch(x, y, torch.arange(len(y)))]})
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(once[1], name)), name


# ------------------------------------------------------------------ the engine's SAM path
def cross_entropy(model, batch):
    return F.cross_entropy(model(batch.x), batch.y)


@pytest.mark.parametrize("spec", [SamSpec(rho=0.2), SamSpec(rho=0.2, adaptive=True),
                                  SamSpec(rho=0.3, lamb=0.5, sign="max")])
def test_trainer_matches_sam_class(spec):
    x, y = img_data(n=24)
    batch = Batch(x, y, torch.arange(len(y)))
    model_a, model_b = tiny_bn_cnn(), tiny_bn_cnn()
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt = SAM(model_a.parameters(), torch.optim.SGD, rho=spec.rho, lamb=spec.lamb, sign=spec.sign,
              adaptive=spec.adaptive, **kwargs)
    trainer = Trainer(model_b, torch.optim.SGD(model_b.parameters(), **kwargs))
    objective = Objective("ce", "train", cross_entropy, sam=spec)
    for _ in range(3):
        sam_steps(opt, model_a, x, y)
        trainer.step([objective], {"train": [batch]})
    assert_all_close(list(model_b.state_dict().values()), list(model_a.state_dict().values()))


def test_trainer_rho_zero_equals_plain_objective():
    x, y = img_data()
    batch = Batch(x, y, torch.arange(len(y)))
    model_a, model_b = tiny_bn_cnn(), tiny_bn_cnn()
    plain = Trainer(model_a, torch.optim.Adam(model_a.parameters(), lr=0.01))
    sam = Trainer(model_b, torch.optim.Adam(model_b.parameters(), lr=0.01))
    for _ in range(3):
        plain.step([Objective("ce", "train", cross_entropy)], {"train": [batch]})
        sam.step([Objective("ce", "train", cross_entropy, sam=SamSpec(rho=0.0))], {"train": [batch]})
    assert_all_equal(list(model_b.state_dict().values()), list(model_a.state_dict().values()))


def random_mask(model: nn.Module, keep: float = 0.5, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.rand(p.shape, generator=g) < keep).to(DTYPE) for name, p in model.named_parameters()}


@pytest.mark.parametrize("adaptive", [False, True])
def test_trainer_mask_freezes_entries_and_confines_the_perturbation(adaptive):
    x, y = mlp_data()
    batch = Batch(x, y, torch.arange(len(y)))
    model = tiny_mlp()
    mask = random_mask(model)
    masks = [mask[name] for name, _ in model.named_parameters()]
    start = weights(model)
    rho = 0.4
    seen: list[list[torch.Tensor]] = []

    def recording_loss(m, b):
        seen.append(weights(m))  # the weights this pass sees
        return F.cross_entropy(m(b.x), b.y)

    # the perturbation expected at the start: e = rho T^2 (g*M) / ||T (g*M)||, zero outside M
    g = grad_at(model, x, y)
    gm = [gi * mi for gi, mi in zip(g, masks, strict=True)]
    t = [wi.abs() if adaptive else torch.ones_like(wi) for wi in start]
    norm = global_norm([ti * gi for ti, gi in zip(t, gm, strict=True)])
    e_expected = [rho * ti * ti * gi / norm for ti, gi in zip(t, gm, strict=True)]

    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.0, weight_decay=0.0))
    objective = Objective("ce", "train", recording_loss, sam=SamSpec(rho=rho, adaptive=adaptive), mask=mask)
    for _ in range(4):
        trainer.step([objective], {"train": [batch]})

    assert len(seen) == 8  # two passes per step
    e_actual = [w1 - w0 for w0, w1 in zip(seen[0], seen[1], strict=True)]
    assert_all_close(e_actual, e_expected)
    for step in range(4):
        w_at, w_pert = seen[2 * step], seen[2 * step + 1]
        for m, a, b in zip(masks, w_at, w_pert, strict=True):
            assert torch.equal((b - a)[m == 0], torch.zeros_like(a[m == 0]))  # perturbation inside M
    end = weights(model)
    for m, w0, w1 in zip(masks, start, end, strict=True):
        assert torch.equal(w1[m == 0], w0[m == 0])  # masked entries never move
        assert not torch.equal(w1[m == 1], w0[m == 1])  # the others do


def test_trainer_mask_rejects_unknown_parameter_names():
    model = tiny_mlp()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = mlp_data()
    objective = Objective("ce", "train", cross_entropy, mask={"no_such.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="no_such.weight"):
        trainer.step([objective], {"train": [Batch(x, y, torch.arange(len(y)))]})


def test_trainer_mask_cache_follows_the_mask_object():
    """A new mask dict (even one reusing a freed object's id) is honoured, not a stale cached one."""
    x, y = mlp_data()
    batch = Batch(x, y, torch.arange(len(y)))
    model = tiny_mlp()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5))
    names = [n for n, _ in model.named_parameters()]
    for step in range(6):
        keep_first = step % 2 == 0
        mask = {n: torch.full_like(p, 1.0 if (i < 2) == keep_first else 0.0)
                for i, (n, p) in enumerate(model.named_parameters())}
        before = weights(model)
        trainer.step([Objective("ce", "train", cross_entropy, mask=mask)], {"train": [batch]})
        after = weights(model)
        del mask  # free it: the next dict may land at the same address
        for i, (w0, w1) in enumerate(zip(before, after, strict=True)):
            moved = not torch.equal(w0, w1)
            assert moved == ((i < 2) == keep_first), (step, names[i])
