"""SAM's extra memory at its floor (issue #19): one parameter-sized buffer per SAM objective beyond a
plain SGD step, counted exactly by :class:`sharp_unlearn.optim.memory.TensorBytes` (the mechanism of
benchmarks/sam_memory.py), for the engine's loop and for the SAM optimizer class."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sharp_unlearn.engine.loop import Trainer
from sharp_unlearn.engine.objective import Batch, Objective, SamSpec
from sharp_unlearn.optim import SAM
from sharp_unlearn.optim.memory import TensorBytes, parameter_bytes
from sharp_unlearn.optim.sam import frozen_bn_stats

#: what else a step may hold at its peak beyond whole parameter-sized buffers (loss scalars, the
#: norm, a batch of 8 activations of width 128), in parameter-sizes; the model below has 107k
#: parameters in 14 tensors, the largest 19 % of them, so a forgotten per-tensor temporary shows too
TOLERANCE = 0.05


def balanced_mlp() -> nn.Module:
    """Parameters dominate and no tensor is most of them, so whole buffers are what the count sees."""
    torch.manual_seed(0)
    widths = [144, 128, 128, 128, 128, 128, 128]
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(128, 10))


def data(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(8, 144, generator=g), torch.randint(0, 10, (8,), generator=g), torch.arange(8))


def ce(model, batch):
    return F.cross_entropy(model(batch.x), batch.y)


def negated_ce(model, batch):
    return -F.cross_entropy(model(batch.x), batch.y)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)


def trainer_step_peak(model: nn.Module, objectives: list[Objective]) -> int:
    model = copy.deepcopy(model)
    trainer = Trainer(model, sgd(model))
    batches = {"retain": [data(1)], "forget": [data(2)]}
    trainer.step(objectives, batches)  # warm-up: the momentum buffers exist before the count
    with TensorBytes() as counter:
        trainer.step(objectives, batches)
    return counter.peak


def masks(model: nn.Module) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(3)
    inside = {n: (torch.rand(p.shape, generator=g) < 0.3).float() for n, p in model.named_parameters()}
    return inside, {n: 1 - m for n, m in inside.items()}


def test_the_count_sees_gradients_and_frees():
    """The mechanism itself: a plain step's peak holds at least the gradient (made by backward,
    inside autograd), and what the step freed is not live any more at its end."""
    model = balanced_mlp()
    unit = parameter_bytes(model)
    trained = copy.deepcopy(model)
    trainer = Trainer(trained, sgd(trained))
    trainer.step([Objective("ce", "retain", ce)], {"retain": [data(1)]})
    with TensorBytes() as counter:
        trainer.step([Objective("ce", "retain", ce)], {"retain": [data(1)]})
    assert counter.peak >= unit
    assert counter.live < 0.05 * unit  # gradients dropped by zero_grad(set_to_none=True)
    with TensorBytes() as counter:
        kept = torch.zeros(1000)
        del kept
        torch.zeros(10)
    assert counter.peak == 4000 and counter.live == 0


@pytest.mark.parametrize("kind, floor", [
    ("sam", 1), ("sam-max lamb 0.5", 1), ("sam-min lamb 0.5", 1), ("asam", 1),
    # ASAM with s*lamb != 1 keeps g and stashes e (e depends on |w|, which the perturbation changes)
    ("asam-max lamb 0.5", 2),
    ("sharp minmax", 2), ("sharp minmax perturbed", 2), ("sharp minmax full", 2),
])
def test_trainer_sam_step_extra_memory_is_at_its_floor(kind, floor):
    model = balanced_mlp()
    inside, outside = masks(model)
    objectives = {
        "sam": [Objective("ce", "retain", ce, sam=SamSpec(rho=0.05))],
        "sam-max lamb 0.5": [Objective("ce", "retain", ce, sam=SamSpec(rho=0.05, sign="max", lamb=0.5))],
        "sam-min lamb 0.5": [Objective("ce", "retain", ce, sam=SamSpec(rho=0.05, lamb=0.5))],
        "asam": [Objective("ce", "retain", ce, sam=SamSpec(rho=0.05, adaptive=True))],
        "asam-max lamb 0.5": [Objective("ce", "retain", ce,
                                        sam=SamSpec(rho=0.05, sign="max", lamb=0.5, adaptive=True))],
        **{f"sharp minmax{suffix}": [
            Objective("retain", "retain", ce, sam=SamSpec(rho=0.05), mask=outside, perturbation=perturbation),
            Objective("forget", "forget", negated_ce, sam=SamSpec(rho=0.05, sign="max"), mask=inside,
                      mask_scope=scope, perturbation=perturbation)]
           for suffix, scope, perturbation in (("", "update", "masked"), (" perturbed", "perturbed", "masked"),
                                               (" full", "update", "full"))},
    }[kind]
    unit = parameter_bytes(model)
    baseline = trainer_step_peak(model, [Objective("ce", "retain", ce)])
    extra = (trainer_step_peak(model, objectives) - baseline) / unit
    assert extra <= floor + TOLERANCE, f"{kind}: {extra:.2f} parameter-sizes over SGD, floor {floor}"


def sam_class_step_peak(model: nn.Module, **sam_kwargs) -> int:
    model = copy.deepcopy(model)
    x, y = data(1).x, data(1).y
    if sam_kwargs:
        opt = SAM(model.parameters(), torch.optim.SGD, lr=1e-3, momentum=0.9, weight_decay=5e-4, **sam_kwargs)
    else:
        opt = sgd(model)

    def step():
        F.cross_entropy(model(x), y).backward()
        if sam_kwargs:
            opt.first_step(zero_grad=True)
            with frozen_bn_stats(model):
                F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.step()
            opt.zero_grad()

    step()
    with TensorBytes() as counter:
        step()
    return counter.peak


@pytest.mark.parametrize("sam_kwargs", [dict(rho=0.05), dict(rho=0.05, sign="max", lamb=0.5),
                                        dict(rho=0.05, adaptive=True)], ids=["sam", "sam-max-0.5", "asam"])
def test_sam_class_extra_memory_is_one_parameter_size(sam_kwargs):
    model = balanced_mlp()
    extra = (sam_class_step_peak(model, **sam_kwargs) - sam_class_step_peak(model)) / parameter_bytes(model)
    assert extra <= 1 + TOLERANCE, f"{extra:.2f} parameter-sizes over SGD"
