"""The Trainer's and the SAM class's in-place SAM arithmetic (issue #19) gives the weights of the
out-of-place arithmetic they replaced, bit for bit. The old code is frozen here, written out in the
test (not imported), so a later change to the shared helpers cannot move both sides at once."""
from __future__ import annotations

import copy

import pytest
import torch
from optim.sam_helpers import img_data, tiny_bn_cnn
from torch import nn
from torch.nn import functional as F

from sharp_unlearn.engine.loop import Trainer
from sharp_unlearn.engine.objective import Batch, Objective, SamSpec
from sharp_unlearn.optim import SAM
from sharp_unlearn.optim.sam import frozen_bn_stats

SIGN = {"min": 1.0, "max": -1.0}


# ------------------------------------------------------------------ the old arithmetic, frozen
def old_perturbation(params, grads, rho, adaptive, global_sq_norm=None, eps=1e-12):
    tg = torch._foreach_mul(torch._foreach_abs(params), grads) if adaptive else list(grads)
    if global_sq_norm is None:
        norms = torch._foreach_norm(tg, 2)
        sq = torch.stack([n.to(norms[0].device) for n in norms]).pow(2).sum()
    else:
        sq = global_sq_norm
    scale = rho / (sq.sqrt() + eps)
    e = torch._foreach_mul(torch._foreach_abs(params), tg) if adaptive else list(tg)
    return torch._foreach_mul(e, scale.to(e[0].device))


def old_combine(first, second, sign, lamb):
    coeff = SIGN[sign] * lamb
    if coeff == 1.0:
        return list(second)
    return torch._foreach_lerp(list(first), list(second), coeff)


class OldTrainer(Trainer):
    """``Trainer`` with the objective gradient as it was before the in-place rewrite."""

    def _grad(self, objective, micro):
        total, loss_sum = None, 0.0
        for batch in micro:
            loss = objective.loss(self.model, batch) / len(micro)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]
            if total is None:
                total = list(grads)
            else:
                torch._foreach_add_(total, grads)
            loss_sum += float(loss.detach())
        return total, loss_sum

    def objective_gradient(self, objective, micro):
        grads, loss = self._grad(objective, micro)
        mask = self._mask_list(objective)
        spec = objective.sam
        if spec is not None and spec.rho > 0:
            masked_e = mask is not None and objective.perturbation == "masked"
            probe = torch._foreach_mul(grads, mask) if masked_e else grads
            with torch.no_grad():
                e = old_perturbation(self.params, probe, spec.rho, spec.adaptive)
                if masked_e:
                    torch._foreach_mul_(e, mask)
                torch._foreach_add_(self.params, e)
            try:
                with frozen_bn_stats(self.model):
                    second, _ = self._grad(objective, micro)
            finally:
                with torch.no_grad():
                    torch._foreach_sub_(self.params, e)
            if mask is not None and objective.mask_scope == "perturbed":
                return old_combine(grads, torch._foreach_mul(second, mask), spec.sign, spec.lamb), loss
            grads = old_combine(grads, second, spec.sign, spec.lamb)
        if mask is not None:
            grads = torch._foreach_mul(grads, mask)
        return grads, loss


class OldSAM(SAM):
    """The ``SAM`` optimizer's two steps as they were: ``g`` cloned and ``e`` stashed, always."""

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        with_grad = [self._with_grad(group) for group in self.param_groups]
        partial = []
        for group, (params, grads) in zip(self.param_groups, with_grad):
            if params:
                tg = torch._foreach_mul(torch._foreach_abs(params), grads) if group["adaptive"] else list(grads)
                norms = torch._foreach_norm(tg, 2)
                partial.append(torch.stack([n.to(norms[0].device) for n in norms]).pow(2).sum())
        global_sq_norm = torch.stack([n.to(partial[0].device) for n in partial]).sum() if partial else None
        for group, (params, grads) in zip(self.param_groups, with_grad):
            if not params:
                continue
            e = old_perturbation(params, grads, group["rho"], group["adaptive"], global_sq_norm=global_sq_norm)
            for p, g, e_p in zip(params, grads, e):
                self.state[p]["old_grad"] = g.clone()
                self.state[p]["e"] = e_p
            torch._foreach_add_(params, e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            params = [p for p in group["params"] if "e" in self.state[p]]
            if not params:
                continue
            torch._foreach_sub_(params, [self.state[p].pop("e") for p in params])
            old = [self.state[p].pop("old_grad") for p in params]
            second = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            for p, g in zip(params, old_combine(old, second, group["sign"], group["lamb"])):
                p.grad = g
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


# ------------------------------------------------------------------ the Trainer
def cross_entropy(model, batch):
    return F.cross_entropy(model(batch.x), batch.y)


def negated(model, batch):
    return -F.cross_entropy(model(batch.x), batch.y)


def half_masks(model: nn.Module, seed: int = 3) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    inside = {n: (torch.rand(p.shape, generator=g) < 0.5).to(p.dtype) for n, p in model.named_parameters()}
    return inside, {n: 1 - m for n, m in inside.items()}


def batches(dtype: torch.dtype, micro: int) -> list[Batch]:
    out = []
    for i in range(micro):
        x, y = img_data(seed=10 + i, n=12)
        out.append(Batch(x.to(dtype), y, torch.arange(len(y))))
    return out


def one_objective(spec):
    return lambda inside, outside: [Objective("ce", "retain", cross_entropy, sam=spec)]


def sharp_minmax(scope, perturbation, max_lamb=1.0):
    def build(inside, outside):
        return [Objective("retain", "retain", cross_entropy, sam=SamSpec(rho=0.3), mask=outside,
                          perturbation=perturbation),
                Objective("forget", "forget", negated, sam=SamSpec(rho=0.2, sign="max", lamb=max_lamb),
                          mask=inside, mask_scope=scope, perturbation=perturbation)]
    return build


def masked(spec, scope, perturbation):
    return lambda inside, outside: [Objective("ce", "retain", cross_entropy, sam=spec, mask=inside,
                                              mask_scope=scope, perturbation=perturbation)]


CASES = {
    "sgd": one_objective(None),
    "sgd-masked": lambda inside, outside: [Objective("ce", "retain", cross_entropy, mask=inside)],
    "sam-min": one_objective(SamSpec(rho=0.3)),
    "sam-max-lamb0.5": one_objective(SamSpec(rho=0.3, sign="max", lamb=0.5)),
    "sam-min-lamb0.5": one_objective(SamSpec(rho=0.3, lamb=0.5)),
    "asam": one_objective(SamSpec(rho=0.3, adaptive=True)),
    "asam-max-lamb0.5": one_objective(SamSpec(rho=0.3, sign="max", lamb=0.5, adaptive=True)),
    **{f"sharp-minmax-{scope}-{pert}": sharp_minmax(scope, pert)
       for scope in ("update", "perturbed") for pert in ("masked", "full")},
    "sharp-minmax-perturbed-masked-lamb0.5": sharp_minmax("perturbed", "masked", max_lamb=0.5),
    **{f"{tag}-{scope}-{pert}": masked(spec, scope, pert)
       for tag, spec in (("sam-max-lamb0.5", SamSpec(rho=0.3, sign="max", lamb=0.5)),
                         ("asam-min", SamSpec(rho=0.3, adaptive=True)),
                         ("asam-max-lamb0.5", SamSpec(rho=0.3, sign="max", lamb=0.5, adaptive=True)))
       for scope in ("update", "perturbed") for pert in ("masked", "full")},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("micro", [1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_trainer_in_place_equals_the_old_arithmetic_bit_for_bit(case, micro, dtype):
    model = tiny_bn_cnn(seed=5).to(dtype)
    inside, outside = half_masks(model)
    objectives = CASES[case](inside, outside)
    runs = []
    for trainer_class in (OldTrainer, Trainer):
        m = copy.deepcopy(model)
        trainer = trainer_class(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4))
        data = {"retain": batches(dtype, micro), "forget": batches(dtype, micro)[::-1]}
        losses = [trainer.step(objectives, data).losses for _ in range(4)]
        runs.append((m, losses))
    (old, old_losses), (new, new_losses) = runs
    assert new_losses == old_losses
    for (name, a), b in zip(new.state_dict().items(), old.state_dict().values()):
        assert torch.equal(a, b), f"{name}: max difference {(a.double() - b.double()).abs().max()}"
    assert not torch.equal(new[0].weight, model[0].weight)  # the steps moved the weights


def test_gradients_shared_between_parameters_are_not_written_through():
    """A backward may hand one tensor to two parameters (an addition) or an expanded view (a
    sum); masking one parameter's gradient in place must not change the other's, nor fail."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.full((3,), 2.0))
            self.b = nn.Parameter(torch.full((3,), 5.0))
            self.c = nn.Parameter(torch.full((3,), 1.0))

    def loss(model, batch):
        # d/da = d/db = the same tensor x (AddBackward passes it through); d/dc = expand(ones)
        return ((model.a + model.b) * batch.x).sum() + model.c.sum()

    model = Shared()
    x = torch.tensor([1.0, 2.0, 3.0])
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    mask = {"a": torch.zeros(3), "b": torch.ones(3), "c": torch.tensor([1.0, 0.0, 1.0])}
    trainer.step([Objective("o", "s", loss, mask=mask)], {"s": [Batch(x, x, x)]})
    assert torch.equal(model.a.detach(), torch.full((3,), 2.0))  # masked out: its gradient is zero
    torch.testing.assert_close(model.b.detach(), torch.full((3,), 5.0) - 0.1 * x)  # b's own gradient, x
    torch.testing.assert_close(model.c.detach(), torch.tensor([0.9, 1.0, 0.9]))


# ------------------------------------------------------------------ the SAM optimizer class
def sam_pass(opt, model, x, y, zero_grad: bool):
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=zero_grad)
    if not zero_grad:
        opt.zero_grad()  # the caller's own reset (set_to_none); the first step kept what it needs
    with frozen_bn_stats(model):
        F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("zero_grad", [True, False])
@pytest.mark.parametrize("settings", [dict(), dict(sign="max", lamb=0.5), dict(lamb=0.5), dict(adaptive=True),
                                      dict(adaptive=True, sign="max", lamb=0.5), "groups"],
                         ids=["sam", "max-0.5", "min-0.5", "asam", "asam-max-0.5", "groups"])
def test_sam_class_in_place_equals_the_old_arithmetic_bit_for_bit(settings, zero_grad):
    x, y = img_data(n=16)
    x = x.float()
    runs = []
    for opt_class in (OldSAM, SAM):
        model = tiny_bn_cnn(seed=7).float()
        if settings == "groups":  # per-group modes in one optimizer: ASAM-max, textbook SAM, SAM-max
            params = [{"params": list(model[0].parameters()), "adaptive": True, "sign": "max", "lamb": 0.5},
                      {"params": list(model[1].parameters())},
                      {"params": list(model[4].parameters()), "sign": "max", "lamb": 1.0}]
            opt = opt_class(params, torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
        else:
            opt = opt_class(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, **settings)
        for _ in range(4):
            sam_pass(opt, model, x, y, zero_grad)
        runs.append(model)
    old, new = runs
    for (name, a), b in zip(new.state_dict().items(), old.state_dict().values()):
        assert torch.equal(a, b), f"{name}: max difference {(a.double() - b.double()).abs().max()}"
