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
Gradient ascent has no retain term: it collapses at a step that depends on
the seed (3 fixed epochs left 29 % forget accuracy on one seed, 79 % on
another), so it is early-stopped: at the first epoch whose forget accuracy is
within the bound, retain accuracy must still be within its bound.

Floating-point results differ between machines and thread counts (the same
seed at 1 and 2 threads memorizes 98.4 % vs 95.2 % of the flips), so the
settings and bounds were checked over fixture seeds 0, 1, 2 (flips, init,
data order) x ``torch.set_num_threads`` 1 and 2. Measured (min-max over those
6 runs; original retain accuracy 100 in all, forget 95.2-100):

================  ============  ============  =============  =============
method            forget, SGD   forget, SAM   retain, SGD    retain, SAM
================  ============  ============  =============  =============
finetune          7.9-27.0      0.0-4.8       99.3-100       98.8-99.8
grad_ascent (1)   34.9-44.4     19.0-44.4     96.8-99.6      98.5-100
l1_sparse         4.8-14.3      1.6-3.2       96.6-100       94.7-99.8
neggrad           0.0-4.8       1.6-9.5       97.1-99.5      98.1-99.3
random_label      0.0-4.8       1.6-7.9       93.5-95.3      95.1-96.9
rum               17.5-33.3     14.3-19.1     97.2-99.1      96.1-99.1
salun             1.6-6.3       1.6-4.8       92.0-93.9      92.2-95.1
scrub             0.0           0.0           99.6-100       99.5-100
sharp_minmax      3.2-27.0      3.2-27.0      94.6-97.3      94.6-97.3
================  ============  ============  =============  =============

(1) at the early-stopping epoch, reached at epochs 6-12 of 20.

Margins: forget at most 33.3 (rum, SGD), 11.7 points under the bound
(grad_ascent: within it by epoch 12 of 20); retain drop at most 8.0 (salun,
SGD, whose spread over the 6 runs is 1.9 points), 4 points under the bound.
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
    "finetune": ({"sgd": 0.1, "sam": 0.05}, 3, {}),
    "l1_sparse": ({"sgd": 0.1, "sam": 0.05}, 3, {}),
    "grad_ascent": ({"sgd": 0.003, "sam": 0.01}, 20, {}),
    "neggrad": ({"sgd": 0.01, "sam": 0.01}, 2, {"alpha": 0.9}),
    "npo": ({"sgd": 0.01, "sam": 0.01}, 2, {"alpha": 0.9, "beta": 0.1}),
    "random_label": ({"sgd": 0.005, "sam": 0.005}, 2, {}),
    "salun": ({"sgd": 0.005, "sam": 0.005}, 2, {"mask_fraction": 0.5}),
    "scrub": ({"sgd": 0.05, "sam": 0.05}, 4, {"max_epochs": 3}),
    "sharp_minmax": ({"sgd": 0.01, "sam": 0.01}, 2, {"alpha": 0.95}),
    # alpha 0.98, not the 0.95 of whole-set sharp_minmax: each group's method averages its forget loss over a
    # third of the forget set, so the same alpha weighs every forget example ~3x; at 0.95 the sharp_minmax
    # group alone cost 12-17 points of retain accuracy
    "rum": ({"sgd": 0.01, "sam": 0.01}, 1, {"alpha": 0.98, "rum_methods": ["neggrad", "scrub", "sharp_minmax"]}),
}


#: methods without a retain term: they collapse at a seed-dependent step, so they are early-stopped
EARLY_STOPPED = {"grad_ascent"}


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
    early = name in EARLY_STOPPED
    run_cfg = load_config([], ["tracking.enabled=false", "train.schedule=constant", "train.checkpoint_every=0",
                               f"train.eval_every={int(early)}", "data.batch_size=64", "seed=0"])
    per_epoch = []  # (forget, retain) accuracy after every epoch, for the early-stopped methods

    def evaluate(model, epoch):
        per_epoch.append((accuracy(model, forget), accuracy(model, retain)))
        return {}

    result = run_stage(model, method.phases, {"retain": retain, "forget": forget, **streams}, cfg=run_cfg,
                       optimizer_cfg=opt_cfg, train_cfg=run_cfg.train, epochs=method.epochs,
                       device=torch.device("cpu"), evaluate=evaluate if early else None, quiet=True)
    assert len(result.history) == method.epochs
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    if early:
        # stop at the first epoch whose forget accuracy is within the bound; retain must still be intact there
        reached = [acc for acc in per_epoch if acc[0] <= FORGET_MAX]
        assert reached, (name, optimizer, before_forget, per_epoch)
        after_forget, after_retain = reached[0]
    else:
        after_forget, after_retain = accuracy(model, forget), accuracy(model, retain)
    assert after_forget <= FORGET_MAX, (name, optimizer, before_forget, after_forget)
    assert after_retain >= before_retain - RETAIN_DROP_MAX, (name, optimizer, before_retain, after_retain)
