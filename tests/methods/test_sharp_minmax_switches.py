"""Sharp MinMax's switches (method.mask_order, forget_mask_scope, forget_perturbation, update_order),
each checked against the update written out by hand for one step on a tiny linear model.

The expected updates use plain torch ops on a functional copy of the model (W, b) with
``torch.autograd.grad`` for the gradients; the engine under test is only asked for its result.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sharp_unlearn.config import MethodConfig, OptimizerConfig
from sharp_unlearn.engine.loop import Trainer
from sharp_unlearn.engine.objective import Batch
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.methods import METHODS
from sharp_unlearn.optim.saliency import load_mask, masks_for_fractions, saliency_mask
from sharp_unlearn.validation import load_config

ALPHA, RHO_MIN, RHO_MAX, LAMB_MIN, LAMB_MAX, LR = 0.7, 0.05, 0.2, 1.0, 0.5, 0.1


def _data():
    g = torch.Generator().manual_seed(3)
    retain = Batch(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g), torch.arange(8))
    forget = Batch(torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g), torch.arange(5))
    return retain, forget


def _model():
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def _mask():
    # a fixed 0/1 pattern over weight (3x4) and bias (3)
    weight = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    bias = torch.tensor([0, 1, 0], dtype=torch.float32)
    return {"weight": weight, "bias": bias}


# ------------------------------------------------------------------ the hand-written formulas
def _grad(w, b, batch, scale):
    """grad of scale * CE(x W^T + b, y) at (w, b)."""
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    loss = scale * F.cross_entropy(batch.x @ w.T + b, batch.y)
    gw, gb = torch.autograd.grad(loss, (w, b))
    return gw, gb


def _side(w, b, batch, scale, mask, rho, lamb, sign, *, scope="update", perturbation="masked", adaptive=False):
    """One side's final gradient: SAM (sign +1 min, -1 max) with the given mask semantics."""
    mw, mb = mask
    gw, gb = _grad(w, b, batch, scale)
    if rho == 0:
        return gw * mw, gb * mb
    pw, pb = (gw * mw, gb * mb) if perturbation == "masked" else (gw, gb)
    if adaptive:
        tw, tb = w.abs() * pw, b.abs() * pb
        norm = torch.sqrt((tw ** 2).sum() + (tb ** 2).sum())
        ew, eb = rho * w.abs() * tw / (norm + 1e-12), rho * b.abs() * tb / (norm + 1e-12)
    else:
        norm = torch.sqrt((pw ** 2).sum() + (pb ** 2).sum())
        ew, eb = rho * pw / (norm + 1e-12), rho * pb / (norm + 1e-12)
    if perturbation == "masked":
        ew, eb = ew * mw, eb * mb
    g2w, g2b = _grad(w + ew, b + eb, batch, scale)
    if scope == "perturbed":
        return gw + sign * lamb * (mw * g2w - gw), gb + sign * lamb * (mb * g2b - gb)
    return mw * (gw + sign * lamb * (g2w - gw)), mb * (gb + sign * lamb * (g2b - gb))


def _retain(w, b, retain, mask, adaptive=False, perturbation="masked"):
    mw, mb = mask
    return _side(w, b, retain, ALPHA, (1 - mw, 1 - mb), RHO_MIN, LAMB_MIN, 1.0, adaptive=adaptive,
                 perturbation=perturbation)


def _forget(w, b, forget, mask, rho=RHO_MAX, **kw):
    return _side(w, b, forget, -(1 - ALPHA), mask, rho, LAMB_MAX, -1.0, **kw)


# ------------------------------------------------------------------ the engine
def _method(optimizer_name="sgd", rho_max=RHO_MAX, **switches):
    cfg = MethodConfig(name="sharp_minmax", alpha=ALPHA, rho_min=RHO_MIN, rho_max=rho_max, lamb_min=LAMB_MIN,
                       lamb_max=LAMB_MAX, **switches)
    opt = OptimizerConfig(name=optimizer_name, lr=LR, momentum=0.0, weight_decay=0.0)
    method = METHODS.get("sharp_minmax")(cfg, opt, None)
    method.mask = _mask()
    method.outside = {k: 1 - v for k, v in method.mask.items()}
    return method


def _engine_step(method, model, optimizer=None, steps=1):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=LR)
    trainer = Trainer(model, optimizer)
    retain, forget = _data()
    for _ in range(steps):
        trainer.step(method.objectives(), {"retain": [retain], "forget": [forget]})
    return trainer


def _start():
    model = _model()
    return model, model.weight.detach().clone(), model.bias.detach().clone()


MASK = (_mask()["weight"], _mask()["bias"])


@pytest.mark.parametrize("optimizer_name", ["sgd", "sam", "asam"])
def test_defaults_are_one_summed_masked_step(optimizer_name):
    model, w, b = _start()
    method = _method(optimizer_name)
    _engine_step(method, model)
    retain, forget = _data()
    adaptive = optimizer_name == "asam"  # the min side follows the optimizer, the max side adaptive_max=False
    rw, rb = _retain(w, b, retain, MASK, adaptive=adaptive)
    fw, fb = _forget(w, b, forget, MASK)
    torch.testing.assert_close(model.weight.detach(), w - LR * (rw + fw), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.bias.detach(), b - LR * (rb + fb), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("optimizer_name,adaptive_max", [("sgd", False), ("sam", True), ("asam", None)])
def test_perturbed_scope_keeps_the_clean_forget_gradient_unmasked(optimizer_name, adaptive_max):
    model, w, b = _start()
    _engine_step(_method(optimizer_name, forget_mask_scope="perturbed", adaptive_max=adaptive_max), model)
    retain, forget = _data()
    rw, rb = _retain(w, b, retain, MASK, adaptive=optimizer_name == "asam")
    adaptive_max = optimizer_name == "asam" if adaptive_max is None else adaptive_max  # None: like the min side
    fw, fb = _forget(w, b, forget, MASK, scope="perturbed", adaptive=adaptive_max)
    torch.testing.assert_close(model.weight.detach(), w - LR * (rw + fw), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.bias.detach(), b - LR * (rb + fb), rtol=1e-5, atol=1e-7)
    # the leak is real: the forget update now reaches entries outside M
    outside_m = MASK[0] == 0
    assert fw[outside_m].abs().max() > 1e-4


def test_perturbed_scope_without_a_sam_pass_masks_the_whole_forget_gradient():
    # a first-order forget side (rho_max=0) has no perturbed point: its gradient is masked whole,
    # as the released code's first-order path does
    model, w, b = _start()
    _engine_step(_method(rho_max=0.0, forget_mask_scope="perturbed"), model)
    retain, forget = _data()
    rw, rb = _retain(w, b, retain, MASK)
    fw, fb = _forget(w, b, forget, MASK, rho=0.0)
    torch.testing.assert_close(model.weight.detach(), w - LR * (rw + fw), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("adaptive_max", [False, True])
def test_full_perturbation_is_built_from_the_unmasked_forget_gradient(adaptive_max):
    model, w, b = _start()
    _engine_step(_method(forget_perturbation="full", adaptive_max=adaptive_max), model)
    retain, forget = _data()
    rw, rb = _retain(w, b, retain, MASK)
    fw, fb = _forget(w, b, forget, MASK, perturbation="full", adaptive=adaptive_max)
    torch.testing.assert_close(model.weight.detach(), w - LR * (rw + fw), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.bias.detach(), b - LR * (rb + fb), rtol=1e-5, atol=1e-7)
    # and it differs from the masked perturbation's update (the switch changes something)
    mw, _ = _forget(w, b, forget, MASK, adaptive=adaptive_max)
    assert (mw - fw).abs().max() > 1e-4


def test_full_retain_perturbation_is_built_from_the_unmasked_retain_gradient():
    model, w, b = _start()
    _engine_step(_method(retain_perturbation="full"), model)
    retain, forget = _data()
    rw, rb = _retain(w, b, retain, MASK, perturbation="full")
    fw, fb = _forget(w, b, forget, MASK)
    torch.testing.assert_close(model.weight.detach(), w - LR * (rw + fw), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.bias.detach(), b - LR * (rb + fb), rtol=1e-5, atol=1e-7)
    masked_w, _ = _retain(w, b, retain, MASK)
    assert (masked_w - rw).abs().max() > 1e-4  # the switch changes the update


@pytest.mark.parametrize("optimizer_name", ["sgd", "asam"])
def test_sequential_steps_forget_at_the_weights_the_retain_step_left(optimizer_name):
    model, w, b = _start()
    _engine_step(_method(optimizer_name, update_order="sequential"), model)
    retain, forget = _data()
    rw, rb = _retain(w, b, retain, MASK, adaptive=optimizer_name == "asam")
    w1, b1 = w - LR * rw, b - LR * rb
    fw, fb = _forget(w1, b1, forget, MASK)
    torch.testing.assert_close(model.weight.detach(), w1 - LR * fw, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.bias.detach(), b1 - LR * fb, rtol=1e-5, atol=1e-7)


def test_sequential_sides_keep_their_own_momentum_and_decay_twice():
    mu, wd = 0.9, 0.01
    model, w, b = _start()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=mu, weight_decay=wd)
    _engine_step(_method(update_order="sequential"), model, optimizer, steps=2)
    retain, forget = _data()
    buf = {}
    for _ in range(2):
        for side, grad_fn in (("retain", lambda w_, b_: _retain(w_, b_, retain, MASK)),
                              ("forget", lambda w_, b_: _forget(w_, b_, forget, MASK))):
            gw, gb = grad_fn(w, b)
            dw, db = gw + wd * w, gb + wd * b  # torch SGD: weight decay enters each side's step
            if side in buf:
                bw, bb = buf[side]
                dw, db = mu * bw + dw, mu * bb + db
            buf[side] = (dw, db)
            w, b = w - LR * dw, b - LR * db
    torch.testing.assert_close(model.weight.detach(), w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.bias.detach(), b, rtol=1e-5, atol=1e-7)


def test_sequential_with_adam_resumes_bit_exactly_from_a_state_dict():
    method = _method(update_order="sequential")
    straight = _model()
    opt_straight = torch.optim.AdamW(straight.parameters(), lr=0.01, weight_decay=5e-4)
    _engine_step(method, straight, opt_straight, steps=3)

    first = _model()
    opt_first = torch.optim.AdamW(first.parameters(), lr=0.01, weight_decay=5e-4)
    _engine_step(method, first, opt_first, steps=2)
    saved_model = copy.deepcopy(first.state_dict())
    saved_opt = copy.deepcopy(opt_first.state_dict())
    assert set(saved_opt["side_states"]) == {"forget"}  # the second side's Adam moments travel with it

    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt_resumed = torch.optim.AdamW(resumed.parameters(), lr=0.01, weight_decay=5e-4)
    trainer = Trainer(resumed, opt_resumed)  # registers the hooks before the load, as the runners do
    opt_resumed.load_state_dict(saved_opt)
    retain, forget = _data()
    trainer.step(method.objectives(), {"retain": [retain], "forget": [forget]})
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)


def test_sequential_resume_does_not_depend_on_when_the_trainer_is_built():
    # an optimizer from build_base_optimizer carries its loading hook from birth: a runner may load
    # the checkpoint before it constructs the Trainer and still gets the forget side's moments back
    from sharp_unlearn.optim.factory import build_base_optimizer

    opt_cfg = OptimizerConfig(name="adamw", lr=0.01, weight_decay=5e-4)
    method = _method(update_order="sequential")
    straight = _model()
    _engine_step(method, straight, build_base_optimizer(straight.parameters(), opt_cfg), steps=3)
    first = _model()
    opt_first = build_base_optimizer(first.parameters(), opt_cfg)
    _engine_step(method, first, opt_first, steps=2)
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt_first.state_dict())

    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt_resumed = build_base_optimizer(resumed.parameters(), opt_cfg)
    opt_resumed.load_state_dict(saved_opt)  # before any Trainer exists
    _engine_step(method, resumed, opt_resumed, steps=1)
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)


def test_joint_checkpoints_carry_no_side_states():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    _engine_step(_method(), model, optimizer)
    assert "side_states" not in optimizer.state_dict()


# ------------------------------------------------------------------ mask order
def _known_scores():
    return {"a.weight": torch.tensor([[3.0, 9.0], [0.0, 7.0]]),
            "b.bias": torch.tensor([5.0, 1.0, 8.0, 2.0, 6.0, 4.0])}


def test_mask_order_smallest_keeps_the_smallest_saliencies():
    mask = saliency_mask(_known_scores(), 0.3, order="smallest")  # 3 of 10: the values 0, 1, 2
    assert mask["a.weight"].tolist() == [[0.0, 0.0], [1.0, 0.0]]
    assert mask["b.bias"].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    largest = saliency_mask(_known_scores(), 0.3)
    assert largest["a.weight"].tolist() == [[0.0, 1.0], [0.0, 1.0]]  # the default is unchanged


def test_mask_order_smallest_nests_and_breaks_ties_by_position():
    nested = masks_for_fractions(_known_scores(), [0.2, 0.5], order="smallest")
    for name in nested[0.2]:
        assert bool((nested[0.2][name] <= nested[0.5][name]).all())
    tied = saliency_mask({"x": torch.tensor([1.0, 2.0, 1.0, 0.0, 1.0])}, 0.6, order="smallest")
    assert tied["x"].tolist() == [1, 0, 1, 1, 0]  # 0.0, then the first two of the tied 1.0s


def test_mask_order_reaches_the_method_mask_and_rejects_a_mismatched_file(tmp_path):
    from sharp_unlearn.data.base import IndexedTensorDataset
    from sharp_unlearn.engine.saliency import forget_gradient_saliency
    from sharp_unlearn.methods.base import UnlearnContext, saliency_mask_for
    from sharp_unlearn.optim.saliency import save_mask

    model = _model()
    retain, forget = _data()
    forget_set = IndexedTensorDataset(forget.x, forget.y)
    ctx = UnlearnContext(model=model, retain=forget_set, forget=forget_set, num_classes=3,
                         device=torch.device("cpu"), seed=0)
    scores = forget_gradient_saliency(model, forget_set)
    cfg = MethodConfig(name="sharp_minmax", mask_fraction=0.25, mask_order="smallest")
    got = saliency_mask_for(ctx, cfg)
    expected = saliency_mask(scores, 0.25, order="smallest")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    path = save_mask(tmp_path / "m.pt", saliency_mask(scores, 0.25), {"fraction": 0.25, "order": "largest"})
    with pytest.raises(ConfigError, match="mask_order"):
        saliency_mask_for(ctx, MethodConfig(name="salun", mask_fraction=0.25, mask_order="smallest",
                                            mask_path=str(path)))


def test_mask_files_record_their_order(tmp_path):
    from sharp_unlearn.recipes.mask import make_masks
    from sharp_unlearn.recipes.pretrain import train_from_scratch
    from sharp_unlearn.recipes.unlearn import load_pretrained, unlearn_config

    common = [f"output_dir={tmp_path}", "tracking.enabled=false", "device=cpu", "threads=1"]
    cfg = load_config([], common + ["train.epochs=1", "model.name=small_cnn",
                                    "model.options={width: 4, feature_dim: 16}"])
    pretrained = load_pretrained(train_from_scratch(cfg, quiet=True).checkpoint)
    paths = {}
    for order in ("largest", "smallest"):
        run_cfg = load_config([], common + ["forget.kind=random", "forget.size=20", "method.name=salun",
                                            f"method.mask_order={order}"], base=unlearn_config(pretrained))
        paths[order] = make_masks(run_cfg, pretrained, [0.3], out_dir=tmp_path / "masks", quiet=True).paths[0.3]
    assert paths["largest"] != paths["smallest"]  # the two orders never overwrite each other
    largest, meta_l = load_mask(paths["largest"])
    smallest, meta_s = load_mask(paths["smallest"])
    assert (meta_l["order"], meta_s["order"]) == ("largest", "smallest")
    # 30 % each, disjoint: the largest and the smallest saliencies share no entry
    assert all(float((largest[n] * smallest[n]).sum()) == 0 for n in largest)


# ------------------------------------------------------------------ config
def test_switch_values_are_validated():
    for key, bad in (("mask_order", "top"), ("forget_mask_scope", "all"), ("forget_perturbation", "none"),
                     ("retain_perturbation", "none"), ("update_order", "alternate")):
        with pytest.raises(ConfigError, match=f"method.{key}='{bad}'"):
            load_config([], ["method.name=sharp_minmax", f"method.{key}={bad}"])


def test_packaged_paper_code_config_sets_every_switch_the_released_way():
    cfg = load_config(["sharp_minmax_paper_code"])
    m, o = cfg.method, cfg.optimizer
    assert (m.name, m.mask_order, m.forget_mask_scope, m.forget_perturbation, m.retain_perturbation,
            m.update_order) == ("sharp_minmax", "smallest", "perturbed", "full", "full", "sequential")
    assert (m.alpha, o.base_name, o.lr, o.weight_decay, o.rho, o.lamb) == (0.99, "adamw", 0.01, 5e-4, 0.1, 1.0)
    # ASAM on both sides when asked
    asked = load_config(["sharp_minmax_paper_code"], ["optimizer.name=asam"])
    method = METHODS.get("sharp_minmax")(asked.method, asked.optimizer, None)
    assert method.min_spec.adaptive and method.max_spec.adaptive
    plain = METHODS.get("sharp_minmax")(cfg.method, cfg.optimizer, None)
    assert not plain.min_spec.adaptive and not plain.max_spec.adaptive


def test_sweep_files_accept_the_switches_and_refuse_bad_values():
    from sharp_unlearn.tuning.spec import parse_sweep

    raw = {"name": "switches", "stage": "unlearn",
           "base": {"data": {"name": "digits"}, "model": {"name": "small_cnn"}, "train": {"epochs": 1}},
           "forget": {"kind": "random", "size": 10}, "method": {"name": "sharp_minmax", "epochs": 1},
           "objective": {"metric": "tow", "mode": "max"},
           "search": {"method.mask_order": {"grid": ["largest", "smallest"]},
                      "method.forget_mask_scope": {"grid": ["update", "perturbed"]},
                      "method.forget_perturbation": {"choice": ["masked", "full"]},
                      "method.update_order": {"grid": ["joint", "sequential"]}}}
    spec = parse_sweep(raw, source="inline")
    assert [d.key for d in spec.dims] == list(raw["search"])
    raw["search"] = {"method.update_order": {"grid": ["joint", "alternate"]}}
    with pytest.raises(ConfigError, match="update_order"):
        parse_sweep(raw, source="inline")


class _Killed(Exception):
    """Stands in for the process dying between two epochs."""


def _paper_code_stage(cfg, checkpoint, kill_after=None):
    from torch.utils.data import Subset

    from sharp_unlearn.data import build_dataset
    from sharp_unlearn.engine.runner import run_stage
    from sharp_unlearn.methods import UnlearnContext
    from sharp_unlearn.models import build_model

    bundle = build_dataset(cfg.data, cfg.seed)
    datasets = {"retain": Subset(bundle.train, range(0, 192)), "forget": Subset(bundle.train, range(192, 224))}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
    method = METHODS.get("sharp_minmax")(cfg.method, cfg.optimizer, None)
    method.prepare(UnlearnContext(model, datasets["retain"], datasets["forget"], bundle.num_classes,
                                  torch.device("cpu"), cfg.seed))

    def evaluate(model, epoch):  # dying here keeps the checkpoint of epoch `kill_after`
        if kill_after is not None and epoch == kill_after + 1:
            raise _Killed
        return {}

    run_stage(model, method.phases, datasets, cfg=cfg, optimizer_cfg=cfg.optimizer, train_cfg=cfg.train,
              epochs=cfg.method.epochs, device=torch.device("cpu"), checkpoint_path=checkpoint,
              checkpoint_meta={"config_hash": "paper-code"}, evaluate=evaluate, quiet=True)
    return model


def test_paper_code_stage_resumes_bit_exactly_through_the_runner(small_cfg, tmp_path):
    """Both sides' AdamW states are in the stage checkpoint: a run killed after epoch 1 and
    resumed ends with the weights of a run that never stopped."""
    from sharp_unlearn.engine.checkpoint import load_checkpoint

    cfg = load_config(["sharp_minmax_paper_code"], [f"output_dir={tmp_path}", "tracking.enabled=false",
                                                    "model.name=mlp", "method.epochs=2", "data.batch_size=64",
                                                    "optimizer.lr=0.001", "threads=1"])
    straight = _paper_code_stage(cfg, tmp_path / "straight.pt")
    with pytest.raises(_Killed):
        _paper_code_stage(cfg, tmp_path / "resumed.pt", kill_after=1)
    assert set(load_checkpoint(tmp_path / "resumed.pt")["optimizer"]["side_states"]) == {"forget"}
    resumed = _paper_code_stage(cfg, tmp_path / "resumed.pt")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
