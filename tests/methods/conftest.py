"""Fixtures of the method tests (helpers live in method_helpers.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sharp_unlearn.config import load_config


@pytest.fixture(scope="session")
def memorized_digits(tmp_path_factory):
    """A small CNN trained on digits with 5 % flipped labels until it memorizes them.

    Returns (cfg, bundle, model state, forget positions = the flipped examples,
    retain positions). The flipped examples are the hardest, most memorized
    forget set there is: the retrained model gets them ~all "wrong".
    """
    from sharp_unlearn.data import build_dataset
    from sharp_unlearn.engine.objective import Objective, Phase
    from sharp_unlearn.engine.runner import run_stage
    from sharp_unlearn.losses import cross_entropy
    from sharp_unlearn.models import build_model

    out = tmp_path_factory.mktemp("digits")
    cfg = load_config([], [f"output_dir={out}", "tracking.enabled=false", "device=cpu", "seed=0",
                           "data.batch_size=64", "data.label_noise=0.05", "model.name=small_cnn",
                           "model.options={width: 16, feature_dim: 64}", "optimizer.lr=0.05",
                           "train.epochs=30", "train.checkpoint_every=0", "train.eval_every=0"])
    bundle = build_dataset(cfg.data, cfg.seed)
    torch.manual_seed(0)
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
    phase = Phase("ce", [Objective("ce", "train", cross_entropy)])
    run_stage(model, lambda epoch: [phase], {"train": bundle.train}, cfg=cfg, optimizer_cfg=cfg.optimizer,
              train_cfg=cfg.train, epochs=cfg.train.epochs, device=torch.device("cpu"), quiet=True)
    forget = np.asarray(bundle.meta["flipped"], dtype=np.int64)
    retain = np.setdiff1d(np.arange(len(bundle.train)), forget)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return cfg, bundle, state, forget, retain
