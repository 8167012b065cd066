"""SAM's cheaper variants (issue #19): perturbation reuse every k steps, SAM on a subset of the
entries, Sharp MinMax with SAM on one side; each checked against the update written out by hand
for one or two SGD steps on a tiny linear model (plain torch ops and ``torch.autograd.grad`` on a
functional copy (W, b); the engine under test is only asked for its result)."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sharp_unlearn.config import MethodConfig, OptimizerConfig
from sharp_unlearn.engine.loop import Trainer
from sharp_unlearn.engine.objective import Batch, Objective
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.methods import METHODS
from sharp_unlearn.optim.factory import sam_spec
from sharp_unlearn.optim.sam import SamSpec, SamVariant
from sharp_unlearn.optim.sam_variants import (
    kth_largest,
    measure_direction,
    random_subset,
    reused_direction,
    salient_subset,
)
from sharp_unlearn.validation import load_config

RHO, LR, SEED = 0.3, 0.2, 1234


def _batches(count):
    g = torch.Generator().manual_seed(5)
    return [Batch(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g), torch.arange(6))
            for _ in range(count)]


def _model():
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def _grad(w, b, batch):
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    gw, gb = torch.autograd.grad(F.cross_entropy(batch.x @ w.T + b, batch.y), (w, b))
    return gw, gb


def _flat(*tensors):
    return torch.cat([t.flatten() for t in tensors])


def _sam_step(w, b, batch, select=None):
    """Exact SAM (min, lamb 1) at (w, b), perturbing only the entries of ``select``; returns g, g(w+e)."""
    gw, gb = _grad(w, b, batch)
    sw, sb = select if select is not None else (torch.ones_like(w), torch.ones_like(b))
    pw, pb = gw * sw, gb * sb
    norm = torch.sqrt((pw ** 2).sum() + (pb ** 2).sum())
    ew, eb = RHO * pw / (norm + 1e-12) * sw, RHO * pb / (norm + 1e-12) * sb
    return (gw, gb), _grad(w + ew, b + eb, batch)


def _train(spec, batches, seed=SEED):
    model = _model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=LR))
    trainer.sam_variants.restart(seed)
    objective = Objective("ce", "train", cross_entropy, sam=spec)
    for batch in batches:
        trainer.step([objective], {"train": [batch]})
    return model.weight.detach(), model.bias.detach()


def _start():
    model = _model()
    return model.weight.detach().clone(), model.bias.detach().clone()


# ------------------------------------------------------------------ exact SAM is the default
@pytest.mark.parametrize("variant", [SamVariant(), SamVariant(every=1, fraction=1.0, subset="saliency")])
def test_neutral_variant_is_bit_identical_to_exact_sam(variant):
    batches = _batches(3)
    plain = _train(SamSpec(rho=RHO), batches)
    neutral = _train(SamSpec(rho=RHO, variant=variant), batches)
    assert all(torch.equal(a, b) for a, b in zip(plain, neutral))


def test_default_optimizer_config_gives_exact_sam():
    assert sam_spec(OptimizerConfig(name="sam")).variant == SamVariant()
    assert SamVariant().exact and not SamVariant(every=2).exact and not SamVariant(fraction=0.5).exact


# ------------------------------------------------------------------ reuse every k steps
def test_reused_direction_is_the_measured_one_at_its_own_gradient():
    g = [torch.randn(3, 4), torch.randn(3)]
    d = [torch.randn(3, 4), torch.randn(3)]
    memory = measure_direction(g, d)
    assert torch.allclose(_flat(*reused_direction(memory, g)), _flat(*d), atol=1e-6)


def test_reused_direction_formula():
    g, d, g_new = ([torch.randn(3, 4), torch.randn(3)] for _ in range(3))
    fg, fd, fn = _flat(*g), _flat(*d), _flat(*g_new)
    c = fg.dot(fd) / fg.dot(fg)
    v = fd - c * fg
    r = v.norm() / fg.norm()
    v_new = v - v.dot(fn) / fn.dot(fn) * fn
    expected = c * fn + r * fn.norm() * v_new / v_new.norm()
    got = _flat(*reused_direction(measure_direction(g, d), g_new))
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, fd, atol=1e-3)  # it is re-fitted, not the stored d


def test_every_two_steps_reuses_the_direction_at_the_second():
    b1, b2, b3 = _batches(3)
    got = _train(SamSpec(rho=RHO, variant=SamVariant(every=2)), [b1, b2, b3])
    w, b = _start()
    # step 1: full SAM, direction d = g(w+e) - g measured at g0
    (gw, gb), (g2w, g2b) = _sam_step(w, b, b1)
    g0, d = _flat(gw, gb), _flat(g2w - gw, g2b - gb)
    w, b = w - LR * g2w, b - LR * g2b
    # step 2: one pass at g1; d re-fitted by hand: c along g0, the rest v (size r relative to g0)
    g1 = _flat(*_grad(w, b, b2))
    c = g0.dot(d) / g0.dot(g0)
    v = d - c * g0
    r = v.norm() / g0.norm()
    v1 = v - v.dot(g1) / g1.dot(g1) * g1
    update = g1 + c * g1 + r * g1.norm() * v1 / v1.norm()
    w, b = w - LR * update[:12].view(3, 4), b - LR * update[12:]
    # step 3: full SAM again (every 2)
    _, (g2w, g2b) = _sam_step(w, b, b3)
    w, b = w - LR * g2w, b - LR * g2b
    assert torch.allclose(got[0], w, atol=1e-5) and torch.allclose(got[1], b, atol=1e-5)


def test_restart_makes_the_next_step_a_full_one():
    b1, b2 = _batches(2)
    model = _model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=LR))
    objective = Objective("ce", "train", cross_entropy, sam=SamSpec(rho=RHO, variant=SamVariant(every=5)))
    trainer.step([objective], {"train": [b1]})
    trainer.sam_variants.restart(0)  # an epoch starts
    trainer.step([objective], {"train": [b2]})
    w, b = _start()
    _, (g2w, g2b) = _sam_step(w, b, b1)
    w, b = w - LR * g2w, b - LR * g2b
    _, (g2w, g2b) = _sam_step(w, b, b2)
    assert torch.allclose(model.weight, w - LR * g2w, atol=1e-6)


# ------------------------------------------------------------------ a subset of the entries
def test_random_subset_perturbs_the_seeded_draw():
    (batch,) = _batches(1)
    got = _train(SamSpec(rho=RHO, variant=SamVariant(fraction=0.4)), [batch])
    w, b = _start()
    generator = torch.Generator().manual_seed(SEED)
    select = ((torch.rand(w.shape, generator=generator) < 0.4).float(),
              (torch.rand(b.shape, generator=generator) < 0.4).float())
    assert 0 < float(_flat(*select).sum()) < 15  # a real subset
    _, (g2w, g2b) = _sam_step(w, b, batch, select)
    assert torch.allclose(got[0], w - LR * g2w, atol=1e-6) and torch.allclose(got[1], b - LR * g2b, atol=1e-6)
    other_seed = _train(SamSpec(rho=RHO, variant=SamVariant(fraction=0.4)), [batch], seed=SEED + 1)
    assert not torch.equal(other_seed[0], got[0])  # re-drawn from the generator, not fixed


def test_saliency_subset_perturbs_the_largest_gradients():
    (batch,) = _batches(1)
    got = _train(SamSpec(rho=RHO, variant=SamVariant(fraction=0.2, subset="saliency")), [batch])
    w, b = _start()
    gw, gb = _grad(w, b, batch)
    scores = _flat(gw, gb).abs()
    keep = round(0.2 * scores.numel())  # 3 of 15 entries
    top = torch.zeros_like(scores)
    top[scores.topk(keep).indices] = 1.0
    _, (g2w, g2b) = _sam_step(w, b, batch, (top[:12].view(3, 4), top[12:]))
    assert torch.allclose(got[0], w - LR * g2w, atol=1e-6) and torch.allclose(got[1], b - LR * g2b, atol=1e-6)


# ------------------------------------------------------------------ Sharp MinMax: SAM on one side
ALPHA = 0.7
MASK = {"weight": torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32),
        "bias": torch.tensor([0, 1, 0], dtype=torch.float32)}


def _minmax(sides):
    cfg = MethodConfig(name="sharp_minmax", alpha=ALPHA, rho_min=RHO, rho_max=RHO, sam_sides=sides)
    method = METHODS.get("sharp_minmax")(cfg, OptimizerConfig(name="sgd", lr=LR, momentum=0.0,
                                                              weight_decay=0.0), None)
    method.mask = MASK
    method.outside = {k: 1 - v for k, v in MASK.items()}
    return method


def _side_grad(w, b, batch, scale, mask, sign):
    """scale * CE's gradient, masked; with SAM (sign +1 min / -1 max, masked e) when sign is given."""
    mw, mb = mask
    gw, gb = (scale * g for g in _grad(w, b, batch))
    if sign is None:
        return gw * mw, gb * mb
    pw, pb = gw * mw, gb * mb
    norm = torch.sqrt((pw ** 2).sum() + (pb ** 2).sum())
    ew, eb = RHO * pw / norm * mw, RHO * pb / norm * mb
    g2w, g2b = (scale * g for g in _grad(w + ew, b + eb, batch))
    return mw * (gw + sign * (g2w - gw)), mb * (gb + sign * (g2b - gb))


@pytest.mark.parametrize("sides", ["both", "forget", "retain"])
def test_sharp_minmax_sam_sides(sides):
    retain, forget = _batches(2)
    method = _minmax(sides)
    model = _model()
    Trainer(model, torch.optim.SGD(model.parameters(), lr=LR)).step(
        method.objectives(), {"retain": [retain], "forget": [forget]})
    w, b = _start()
    inside, outside = (MASK["weight"], MASK["bias"]), (1 - MASK["weight"], 1 - MASK["bias"])
    rw, rb = _side_grad(w, b, retain, ALPHA, outside, 1.0 if sides in ("both", "retain") else None)
    fw, fb = _side_grad(w, b, forget, -(1 - ALPHA), inside, -1.0 if sides in ("both", "forget") else None)
    assert torch.allclose(model.weight, w - LR * (rw + fw), atol=1e-6)
    assert torch.allclose(model.bias, b - LR * (rb + fb), atol=1e-6)
    expected_tag = {"both": "sam-min/sam-max", "forget": "sgd/sam-max", "retain": "sam-min/sgd"}[sides]
    assert method.optimizer_tag == expected_tag


# ------------------------------------------------------------------ config keys
def test_variant_keys_flow_from_the_config_to_both_minmax_sides():
    cfg = load_config([], ["method.name=sharp_minmax", "optimizer.sam_every=3", "optimizer.sam_fraction=0.25",
                           "optimizer.sam_subset=saliency", "forget.kind=random", "forget.size=10"])
    method = METHODS.get("sharp_minmax")(cfg.method, cfg.optimizer, sam_spec(cfg.optimizer))
    expected = SamVariant(every=3, fraction=0.25, subset="saliency")
    assert method.min_spec.variant == expected and method.max_spec.variant == expected


@pytest.mark.parametrize("override, named", [
    ("optimizer.sam_every=0", "optimizer.sam_every=0"),
    ("optimizer.sam_every=1.5", "optimizer.sam_every=1.5"),
    ("optimizer.sam_fraction=0", "optimizer.sam_fraction=0.0"),
    ("optimizer.sam_fraction=1.5", "optimizer.sam_fraction=1.5"),
    ("optimizer.sam_subset=topk", "optimizer.sam_subset='topk'"),
    ("method.sam_sides=neither", "method.sam_sides='neither'"),
])
def test_bad_variant_values_are_config_errors_naming_them(override, named):
    with pytest.raises(ConfigError) as info:
        load_config([], ["method.name=sharp_minmax", "forget.kind=random", "forget.size=10", override])
    assert named in str(info.value) and "\n" not in str(info.value)


def test_neutral_variant_keys_leave_config_hashes_unchanged():
    minmax = ["method.name=sharp_minmax", "forget.kind=random", "forget.size=10"]
    base = load_config([], minmax)
    spelled = load_config([], [*minmax, "optimizer.sam_every=1", "optimizer.sam_fraction=1.0",
                               "optimizer.sam_subset=random", "method.sam_sides=both"])
    assert spelled.training_hash() == base.training_hash() and spelled.hash_tree() == base.hash_tree()
    assert "sam_every" not in base.hash_tree()["optimizer"] and "sam_sides" not in base.hash_tree()["method"]
    assert base.flat()["optimizer.sam_every"] == 1 and base.flat()["method.sam_sides"] == "both"  # MLflow params
    cheaper = load_config([], [*minmax, "optimizer.sam_every=2"])
    assert cheaper.training_hash() != base.training_hash()


def test_sharded_configs_take_reuse_subsets_and_sam_sides():
    sharded = ["method.name=sharp_minmax", "forget.kind=random", "forget.size=10", "distributed.backend=deepspeed"]
    cfg = load_config([], [*sharded, "optimizer.sam_every=2", "optimizer.sam_fraction=0.5",
                           "optimizer.sam_subset=saliency", "method.sam_sides=forget"])
    assert cfg.distributed.backend == "deepspeed"
    assert (cfg.optimizer.sam_every, cfg.optimizer.sam_fraction, cfg.optimizer.sam_subset) == (2, 0.5, "saliency")
    assert cfg.method.sam_sides == "forget"


# ------------------------------------------------------------------ the sharded forms (pieces on ranks)
def _on_two_ranks(work):
    """``work(rank, reduce)`` on two threads whose ``reduce`` sums both threads' values, as an
    all-reduce over two ranks does; returns both results."""
    barrier = threading.Barrier(2, timeout=30)  # a thread that fails breaks the barrier: no hang
    posted: list = [None, None]
    results: list = [None, None]

    def reduce_for(rank):
        def reduce(values):
            posted[rank] = [float(v) for v in values]
            barrier.wait()
            total = [a + b for a, b in zip(*posted)]
            barrier.wait()  # both have read the sums before either posts again
            return total
        return reduce

    def run(rank):
        results[rank] = work(rank, reduce_for(rank))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _split(tensors, cuts):
    """Each tensor's flat form cut at ``cuts[i]``: (rank 0's pieces, rank 1's pieces)."""
    return ([t.reshape(-1)[:c] for t, c in zip(tensors, cuts)], [t.reshape(-1)[c:] for t, c in zip(tensors, cuts)])


@pytest.mark.parametrize("masked", [False, True])
def test_saliency_subset_over_two_ranks_is_the_single_process_one(masked):
    gen = torch.Generator().manual_seed(3)
    # rounded values: many ties at the threshold, and exact zeros
    grads = [torch.randn(shape, generator=gen).round(decimals=1) for shape in ((7, 5), (9,), (4, 3))]
    within = [(torch.rand(g.shape, generator=gen) < 0.6).float() for g in grads] if masked else None
    whole = salient_subset(grads, 0.3, within)
    cuts = (12, 9, 0)  # a tensor wholly on rank 0, one wholly on rank 1
    pieces, mask_pieces = _split(grads, cuts), _split(within, cuts) if masked else (None, None)
    halves = _on_two_ranks(lambda rank, reduce: salient_subset(pieces[rank], 0.3, mask_pieces[rank], reduce))
    for i, full in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][i], halves[1][i]]), full.reshape(-1))
    assert 0 < sum(float(m.sum()) for m in whole) < sum(g.numel() for g in grads)


@pytest.mark.parametrize("k", [1, 2, 17, 40, 60])
def test_kth_largest_over_two_ranks_is_torch_kthvalue(k):
    scores = torch.randn(60, generator=torch.Generator().manual_seed(4)).abs().round(decimals=1)
    scores[:5] = 0.0
    expected = torch.kthvalue(scores, scores.numel() - k + 1).values
    assert torch.equal(kth_largest([scores[:25], scores[25:]], k), expected)
    on_ranks = _on_two_ranks(lambda rank, reduce: kth_largest([(scores[:25], scores[25:])[rank]], k, reduce))
    assert torch.equal(on_ranks[0], expected) and torch.equal(on_ranks[1], expected)
    with pytest.raises(ValueError, match="k=61"):
        kth_largest([scores], 61)


def test_random_subset_of_pieces_is_the_single_process_draw_cut_to_them():
    shapes = [torch.Size((6, 4)), torch.Size((5,)), torch.Size((3, 3))]
    whole = random_subset([torch.zeros(s) for s in shapes], 0.5, torch.Generator().manual_seed(9))
    # this rank holds entries 10..23 of the first parameter, none of the second, 0..3 of the third
    pieces = [(shapes[0], 10, 14), (shapes[1], 0, 0), (shapes[2], 0, 4)]
    held = random_subset([torch.zeros(14), torch.zeros(4)], 0.5, torch.Generator().manual_seed(9), pieces=pieces)
    assert torch.equal(held[0], whole[0].reshape(-1)[10:24]) and torch.equal(held[1], whole[2].reshape(-1)[:4])
