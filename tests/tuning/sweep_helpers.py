"""A tiny sweep (digits, small CNN, NegGrad+ on the flipped labels) the tuning tests start from."""
from __future__ import annotations

import copy

from sharp_unlearn.tuning import parse_sweep

TINY = {"seed": 0, "data": {"name": "digits", "label_noise": 0.05, "batch_size": 64, "augment": False},
        "model": {"name": "small_cnn", "options": {"width": 8, "feature_dim": 32}},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
        "train": {"epochs": 3, "schedule": "cosine"}}


def sweep(tmp_path, **changes):
    raw = {"name": "t", "stage": "unlearn", "base": copy.deepcopy(TINY), "output_dir": str(tmp_path / "runs"),
           "forget": {"kind": "memorization", "level": "high", "size": 20, "scores": "flipped"},
           "unlearn": {"optimizer": {"lr": 0.02}, "train": {"schedule": "constant"}},
           "method": {"name": "neggrad", "epochs": 3, "alpha": 0.9},
           "search": {"method.alpha": {"uniform": [0.8, 0.99]}}}
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def parse(tmp_path, **changes):
    return parse_sweep(sweep(tmp_path, **changes), tracking={"enabled": False})
