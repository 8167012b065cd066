"""Random labels: never the true label, a pure function of (index, seed), spread over the other classes."""
from __future__ import annotations

import pytest
import torch
from method_helpers import full_batch, make_method, tiny_bn_net, tiny_context
from torch.nn import functional as F

from sharp_unlearn.methods.random_label import random_labels


@pytest.mark.parametrize("num_classes", [2, 3, 10, 100])
def test_never_the_true_label(num_classes):
    index = torch.arange(20_000)
    labels = index % num_classes
    out = random_labels(labels, index, num_classes, seed=3)
    assert not bool((out == labels).any())
    assert int(out.min()) >= 0 and int(out.max()) < num_classes


def test_deterministic_per_index_and_seed():
    index = torch.tensor([5, 17, 123456789, 0, 42])
    labels = torch.tensor([1, 2, 3, 4, 5])
    a = random_labels(labels, index, 10, seed=7)
    # the same example gets the same label whatever batch it arrives in
    perm = torch.tensor([3, 0, 4, 1, 2])
    b = random_labels(labels[perm], index[perm], 10, seed=7)
    assert torch.equal(a[perm], b)
    assert torch.equal(a, random_labels(labels, index, 10, seed=7))
    many = torch.arange(1000)
    zeros = torch.zeros(1000, dtype=torch.long)
    assert not torch.equal(random_labels(zeros, many, 10, 7), random_labels(zeros, many, 10, 8))


def test_roughly_uniform_over_other_classes():
    index = torch.arange(30_000)
    labels = torch.zeros_like(index)
    counts = torch.bincount(random_labels(labels, index, 10, seed=0), minlength=10)
    assert counts[0] == 0
    expected = 30_000 / 9
    assert all(abs(int(c) - expected) < 0.06 * expected for c in counts[1:])
    # consecutive indices are not a simple cycle
    out = random_labels(labels[:100], index[:100], 10, seed=0)
    assert len({tuple(out[i:i + 9].tolist()) for i in range(0, 90, 9)}) == 10


def test_random_label_method_objectives():
    model = tiny_bn_net()
    ctx = tiny_context(model)
    method = make_method("random_label", "sgd")
    method.prepare(ctx)
    [phase] = method.phases(0)
    forget, retain = phase.objectives
    assert (forget.stream, retain.stream, phase.driver_stream) == ("forget", "retain", "retain")
    assert forget.mask is None and retain.mask is None
    batch = full_batch(ctx.forget)
    model.train()
    expected = F.cross_entropy(model(batch.x), random_labels(batch.y, batch.index, 3, ctx.seed))
    torch.testing.assert_close(forget.loss(model, batch), expected)
    rbatch = full_batch(ctx.retain)
    torch.testing.assert_close(retain.loss(model, rbatch), F.cross_entropy(model(rbatch.x), rbatch.y))


def test_random_label_needs_prepare():
    with pytest.raises(RuntimeError, match="prepare"):
        make_method("random_label").phases(0)
