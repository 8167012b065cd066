"""The Trainer (engine/loop.py): its SAM path equals the SAM optimizer class, rho = 0 is the plain
objective, BatchNorm statistics move once per step, and masks freeze entries and confine the
perturbation. References are computed by hand (tests/optim/sam_helpers.py), not through the engine.
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
    mlp_data,
    sam_steps,
    tiny_bn_cnn,
    tiny_mlp,
    weights,
)
from torch import nn
from torch.nn import functional as F

from sharp_unlearn.engine.loop import Trainer
from sharp_unlearn.engine.objective import Batch, Objective, SamSpec
from sharp_unlearn.optim import SAM


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
