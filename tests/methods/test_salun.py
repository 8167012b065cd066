"""SalUn: random-label forgetting restricted to the saliency mask; mask sources and their checks."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from method_helpers import make_method, tiny_bn_net, tiny_context

from sharp_unlearn.engine.runner import run_stage
from sharp_unlearn.engine.saliency import forget_gradient_saliency
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.optim.saliency import saliency_mask, save_mask


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("optimizer,extra", [("sgd", ["optimizer.momentum=0.9"]),
                                             ("sam", ["optimizer.momentum=0.9", "optimizer.rho=0.1"]),
                                             ("adam", ["optimizer.lr=0.01"])])
def test_only_masked_entries_move(small_cfg, optimizer, extra):
    model = tiny_bn_net()
    ctx = tiny_context(model)
    method = make_method("salun", optimizer, {"weight_decay": 0.0}, mask_fraction=0.2, epochs=2)
    method.prepare(ctx)
    expected = saliency_mask(forget_gradient_saliency(copy.deepcopy(model), ctx.forget, "cpu", 64), 0.2)
    names = [n for n, _ in model.named_parameters()]
    inside = flat([expected[n] for n in names]).bool()
    for objective in method.phases(0)[0].objectives:
        assert objective.mask is method.mask
    w0 = flat([p.detach().clone() for p in model.parameters()])
    cfg = small_cfg(f"optimizer.name={optimizer}", "optimizer.weight_decay=0", "data.batch_size=8", *extra)
    run_stage(model, method.phases, {"retain": ctx.retain, "forget": ctx.forget}, cfg=cfg,
              optimizer_cfg=cfg.optimizer, train_cfg=cfg.train, epochs=method.epochs, device=torch.device("cpu"),
              quiet=True)
    w1 = flat([p.detach() for p in model.parameters()])
    assert torch.equal(w1[~inside], w0[~inside])
    moved = (w1 != w0) & inside
    assert int(moved.sum()) > 0.9 * int(inside.sum())


def test_given_mask_is_used_and_checked():
    model = tiny_bn_net()
    mask = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    mask["4.bias"] = torch.ones(3, dtype=torch.float64)
    method = make_method("salun", mask_fraction=0.2)
    method.prepare(_ctx_with_mask(model, mask))
    assert float(method.mask["4.bias"].sum()) == 3 and float(method.mask["4.weight"].sum()) == 0
    bad = dict(mask)
    bad.pop("0.weight")
    with pytest.raises(ConfigError, match="missing"):
        make_method("salun").prepare(_ctx_with_mask(model, bad))


def _ctx_with_mask(model, mask, **extras):
    ctx = tiny_context(model, **extras)
    ctx.mask = mask
    return ctx


def test_mask_file_must_match_fraction_and_split(tmp_path):
    model = tiny_bn_net()
    ctx = tiny_context(model, split=SimpleNamespace(split_hash="aaa"))
    mask = saliency_mask(forget_gradient_saliency(model, ctx.forget, "cpu", 64), 0.3)
    path = save_mask(tmp_path / "m.pt", mask, {"fraction": 0.3, "split_hash": "aaa"})
    method = make_method("salun", mask_fraction=0.3, mask_path=str(path))
    method.prepare(ctx)
    assert all(torch.equal(method.mask[n], mask[n]) for n in mask)
    with pytest.raises(ConfigError, match="mask_fraction=0.3"):
        make_method("salun", mask_fraction=0.5, mask_path=str(path)).prepare(ctx)
    other = tiny_context(model, split=SimpleNamespace(split_hash="bbb"))
    with pytest.raises(ConfigError, match="forget split 'aaa'"):
        make_method("salun", mask_fraction=0.3, mask_path=str(path)).prepare(other)
    with pytest.raises(ConfigError, match="does not match the model"):
        make_method("salun", mask_fraction=0.3, mask_path=str(path)).prepare(
            tiny_context(torch.nn.Linear(16, 3), split=SimpleNamespace(split_hash="aaa")))
