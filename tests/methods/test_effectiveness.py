"""Every method forgets memorized examples on digits, with SGD and with SAM, through run_stage.

Set-up (``memorized_digits``): a small CNN trained 30 epochs on digits with 5 %
of the training labels flipped; it fits the 63 flipped examples (forget
accuracy ~95 % on their flipped labels) at 100 % retain accuracy. A retrained
model would score ~0 % on them (it predicts the true digit), so this is the
hardest kind of forget set: pure memorization.

Stated bound, for every method and both optimizers: forget accuracy drops to
at most 45 % (at least 50 points down), and retain accuracy stays within 12
points of the original. Hyper-parameters are per method and optimizer (as in
any unlearning benchmark: gradient ascent needs a radius-dependent lr, SCRUB
more epochs than NegGrad+); constant lr, momentum 0.9, weight decay 5e-4.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from method_helpers import subset

from sharp_unlearn.config import MethodConfig, OptimizerConfig, load_config
from sharp_unlearn.engine.loop import accuracy
from sharp_unlearn.engine.runner import run_stage
from sharp_unlearn.methods import METHODS, UnlearnContext
from sharp_unlearn.models import build_model
from sharp_unlearn.optim.factory import sam_spec

FORGET_MAX = 45.0
RETAIN_DROP_MAX = 12.0

#: method -> {optimizer: lr}, epochs, method options
SETTINGS = {
    "finetune": ({"sgd": 0.05, "sam": 0.05}, 3, {}),
    "l1_sparse": ({"sgd": 0.05, "sam": 0.05}, 3, {}),
    "grad_ascent": ({"sgd": 0.015, "sam": 0.05}, 3, {}),
    "neggrad": ({"sgd": 0.01, "sam": 0.01}, 2, {"alpha": 0.9}),
    "random_label": ({"sgd": 0.005, "sam": 0.005}, 2, {}),
    "salun": ({"sgd": 0.005, "sam": 0.005}, 2, {"mask_fraction": 0.5}),
    "scrub": ({"sgd": 0.05, "sam": 0.05}, 4, {"max_epochs": 3}),
    "sharp_minmax": ({"sgd": 0.01, "sam": 0.01}, 2, {"alpha": 0.95}),
    "rum": ({"sgd": 0.01, "sam": 0.01}, 1, {"alpha": 0.95, "rum_methods": ["neggrad", "scrub", "sharp_minmax"]}),
}


def test_every_unlearning_method_is_covered():
    assert set(SETTINGS) == set(METHODS.names()) - {"retrain"}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_method_forgets_memorized_examples(memorized_digits, name, optimizer):
    cfg, bundle, state, forget_pos, retain_pos = memorized_digits
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
    model.load_state_dict(state)
    forget, retain = subset(bundle.train, forget_pos), subset(bundle.train, retain_pos)
    before_forget, before_retain = accuracy(model, forget), accuracy(model, retain)
    assert before_forget > 85.0 and before_retain > 99.0  # the set-up really memorized the flips

    lrs, epochs, options = SETTINGS[name]
    opt_cfg = OptimizerConfig(name=optimizer, lr=lrs[optimizer], momentum=0.9, weight_decay=5e-4, rho=0.05)
    method = METHODS.get(name)(MethodConfig(name=name, epochs=epochs, **options), opt_cfg, sam_spec(opt_cfg))
    with torch.no_grad():  # per-example loss as the memorization score (RUM's groups)
        model.eval()
        x = torch.stack([forget[i][0] for i in range(len(forget))])
        y = torch.stack([forget[i][1] for i in range(len(forget))])
        scores = torch.nn.functional.cross_entropy(model(x), y, reduction="none").numpy()
    ctx = UnlearnContext(model=model, retain=retain, forget=forget, num_classes=bundle.num_classes,
                         device=torch.device("cpu"), seed=0, batch_size=64, extras={"forget_scores": scores})
    streams = method.prepare(ctx) or {}
    run_cfg = load_config([], ["tracking.enabled=false", "train.schedule=constant", "train.checkpoint_every=0",
                               "train.eval_every=0", "data.batch_size=64", "seed=0"])
    result = run_stage(model, method.phases, {"retain": retain, "forget": forget, **streams}, cfg=run_cfg,
                       optimizer_cfg=opt_cfg, train_cfg=run_cfg.train, epochs=method.epochs,
                       device=torch.device("cpu"), quiet=True)
    assert len(result.history) == method.epochs
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    after_forget, after_retain = accuracy(model, forget), accuracy(model, retain)
    assert after_forget <= FORGET_MAX, (name, optimizer, before_forget, after_forget)
    assert after_retain >= before_retain - RETAIN_DROP_MAX, (name, optimizer, before_retain, after_retain)
