"""Saliency masks: direction (largest |grad|), counts, ties, gradients, files."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sharp_unlearn.data.base import IndexedTensorDataset
from sharp_unlearn.engine.saliency import forget_gradient_saliency
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.optim.saliency import (
    check_mask,
    complement,
    load_mask,
    mask_fraction,
    masks_for_fractions,
    saliency_mask,
    save_mask,
)


def known_scores() -> dict[str, torch.Tensor]:
    # 10 entries over two "parameters"; values 0..9 placed out of order
    return {"a.weight": torch.tensor([[3.0, 9.0], [0.0, 7.0]]),
            "b.bias": torch.tensor([5.0, 1.0, 8.0, 2.0, 6.0, 4.0])}


def test_mask_selects_largest_entries_over_all_parameters():
    mask = saliency_mask(known_scores(), 0.3)  # 3 of 10: the values 9, 8, 7
    assert mask["a.weight"].tolist() == [[0.0, 1.0], [0.0, 1.0]]
    assert mask["b.bias"].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert mask["a.weight"].dtype == torch.float32


def test_mask_direction_is_not_smallest():
    scores = known_scores()
    mask = saliency_mask(scores, 0.5)
    chosen = torch.cat([s[m.bool()] for s, m in zip(scores.values(), mask.values())])
    rest = torch.cat([s[~m.bool()] for s, m in zip(scores.values(), mask.values())])
    assert sorted(chosen.tolist()) == [5.0, 6.0, 7.0, 8.0, 9.0]
    assert chosen.min() > rest.max()


def test_mask_count_and_ties_are_deterministic():
    scores = {"w": torch.ones(4), "v": torch.ones(2, 3)}  # all tied
    mask = saliency_mask(scores, 0.5)  # 5 of 10: first five in (w then v) order
    assert mask["w"].tolist() == [1, 1, 1, 1]
    assert mask["v"].tolist() == [[1, 0, 0], [0, 0, 0]]
    # a partial tie at the threshold: 2 > ties(1.0) > 0; need 3 => the 2.0 plus the first two 1.0s
    scores = {"x": torch.tensor([1.0, 0.0, 1.0, 2.0, 1.0])}
    assert saliency_mask(scores, 0.6)["x"].tolist() == [1, 0, 1, 1, 0]
    assert saliency_mask(scores, 0.6)["x"].tolist() == saliency_mask(scores, 0.6)["x"].tolist()


def test_mask_fraction_count_random_scores():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(37, 11, generator=g), "b": torch.rand(50, generator=g)}
    n = 37 * 11 + 50
    for fraction in (0.01, 0.1, 0.5, 0.9):
        mask = saliency_mask(scores, fraction)
        assert sum(int(m.sum()) for m in mask.values()) == math.floor(fraction * n + 0.5)  # half rounds up
        flat = torch.cat([s.flatten() for s in scores.values()])
        flat_mask = torch.cat([m.flatten() for m in mask.values()]).bool()
        assert flat[flat_mask].min() >= flat[~flat_mask].max()


def test_masks_for_fractions_nested_and_equal_to_single():
    g = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(20, 5, generator=g), "b": torch.rand(7, generator=g)}
    masks = masks_for_fractions(scores, [0.1, 0.3, 0.5])
    assert list(masks) == [0.1, 0.3, 0.5]
    for f, m in masks.items():
        single = saliency_mask(scores, f)
        assert all(torch.equal(m[k], single[k]) for k in m)
    for k in scores:
        assert bool((masks[0.1][k] <= masks[0.3][k]).all()) and bool((masks[0.3][k] <= masks[0.5][k]).all())
    assert mask_fraction(masks[0.3]) == pytest.approx(round(0.3 * 107) / 107)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_bad_fraction_rejected(fraction):
    with pytest.raises(ConfigError, match="fraction"):
        saliency_mask(known_scores(), fraction)


def test_non_finite_scores_rejected():
    with pytest.raises(ValueError, match="NaN"):
        saliency_mask({"w": torch.tensor([1.0, float("nan")])}, 0.5)


def test_complement():
    mask = saliency_mask(known_scores(), 0.3)
    comp = complement(mask)
    for k in mask:
        assert torch.equal(mask[k] + comp[k], torch.ones_like(mask[k]))


# ------------------------------------------------------------------ gradients
def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def forget_data(n: int = 13) -> IndexedTensorDataset:
    g = torch.Generator().manual_seed(3)
    return IndexedTensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_saliency_is_abs_grad_of_mean_forget_ce_in_eval_mode():
    model = bn_model()
    data = forget_data()
    model.train()
    bn_before = {k: v.clone() for k, v in model[2].state_dict().items()}
    scores = forget_gradient_saliency(model, data, "cpu", batch_size=4)
    # reference: one full batch, eval mode, autograd of the mean CE
    reference = bn_model()
    reference.eval()
    loss = F.cross_entropy(reference(data.x), data.y)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    names = [n for n, _ in reference.named_parameters()]
    assert list(scores) == names
    for name, g in zip(names, grads):
        torch.testing.assert_close(scores[name], g.abs(), rtol=1e-5, atol=1e-7)
    # batch size does not change the scores (sum-reduced accumulation)
    again = forget_gradient_saliency(model, data, "cpu", batch_size=13)
    for name in names:
        torch.testing.assert_close(scores[name], again[name], rtol=1e-5, atol=1e-7)
    # BN running statistics untouched, mode restored, .grad untouched
    for k, v in model[2].state_dict().items():
        assert torch.equal(v, bn_before[k]), k
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_saliency_mask_marks_the_parameters_the_forget_loss_uses():
    # logits depend only on the first 2 of 6 inputs through "used"; "unused" sees a zero input
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(2, 3)
            self.unused = nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x[:, :2]) + self.unused(torch.zeros_like(x[:, 2:])) * 0.0

    model = Split()
    mask = saliency_mask(forget_gradient_saliency(model, forget_data(), "cpu", 8), 0.25)
    assert mask["unused.weight"].sum() == 0
    assert mask["used.weight"].sum() + mask["used.bias"].sum() == round(0.25 * (9 + 15))


def test_empty_forget_set_rejected():
    empty = IndexedTensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ConfigError, match="empty"):
        forget_gradient_saliency(bn_model(), empty)


# ------------------------------------------------------------------ files
def test_save_load_roundtrip_atomic(tmp_path):
    mask = saliency_mask(known_scores(), 0.3)
    path = save_mask(tmp_path / "m" / "mask.pt", mask, {"fraction": 0.3, "split_hash": "abc", "n": torch.tensor(3)})
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["mask.pt"]  # no temp file left
    loaded, meta = load_mask(path)
    assert meta == {"fraction": 0.3, "split_hash": "abc", "n": 3}
    for k in mask:
        assert torch.equal(loaded[k], mask[k])
    # stored as booleans, readable with weights_only=True
    raw = torch.load(path, weights_only=True)
    assert raw["mask"]["a.weight"].dtype == torch.bool


def test_load_mask_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_mask(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_mask(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ConfigError, match="not a sharp-unlearn mask"):
        load_mask(tmp_path / "ckpt.pt")


def test_check_mask_against_model():
    model = nn.Linear(3, 2)
    good = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
    assert set(check_mask(good, model)) == {"weight", "bias"}
    with pytest.raises(ConfigError, match="missing"):
        check_mask({"weight": torch.ones(2, 3)}, model)
    with pytest.raises(ConfigError, match="shape of weight"):
        check_mask({"weight": torch.ones(3, 3), "bias": torch.zeros(2)}, model)
    with pytest.raises(ConfigError, match="0/1"):
        check_mask({"weight": torch.full((2, 3), 0.5), "bias": torch.zeros(2)}, model)
