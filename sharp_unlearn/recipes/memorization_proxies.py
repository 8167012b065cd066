"""Cheap memorization proxies, recorded during ONE training run on the full training set.

After every epoch the model is put in eval mode and measured on every
training example (no augmentation); from those per-epoch records:

* ``loss``: mean per-example cross-entropy over the epochs;
* ``confidence``: 1 - mean softmax probability of the (given) label over the
  epochs (inverted so that, like memorization, higher = harder);
* ``learning_speed``: 1 - share of epochs the example was classified
  correctly (accumulated correctness, inverted: late-learned examples score high).

These rank examples like the held-out estimate at the cost of one training
instead of K (Jiang et al. 2021 report learning speed as a good proxy); their
agreement with the held-out estimate is reported as a Spearman correlation.

The per-epoch records are cached under ``<output_dir>/memorization/proxies/``,
keyed by the training hash, so asking for another proxy kind is free.
"""
from __future__ import annotations

import contextlib
import dataclasses
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from sharp_unlearn.config import ExperimentConfig
from sharp_unlearn.data import build_dataset
from sharp_unlearn.engine.loop import predict
from sharp_unlearn.engine.objective import Objective, Phase
from sharp_unlearn.engine.runner import resolve_device, run_stage
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.files import atomic_path
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.models import build_model
from sharp_unlearn.optim.factory import sam_spec

PROXY_KINDS = ("loss", "confidence", "learning_speed")


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    if not kinds:
        raise ConfigError(f"no memorization proxy requested; expected some of: {', '.join(PROXY_KINDS)}")
    for kind in kinds:
        if kind not in PROXY_KINDS:
            raise ConfigError(f"memorization proxy {kind!r} is not known; expected one of: {', '.join(PROXY_KINDS)}")
    return kinds


def proxies_from_records(prob_label: np.ndarray, loss: np.ndarray, correct: np.ndarray,
                         kinds: Sequence[str] = PROXY_KINDS) -> dict[str, np.ndarray]:
    """Proxy scores from per-epoch records (each ``[epochs, n]``); higher = more memorized."""
    derive = {
        "loss": lambda: loss.mean(axis=0),
        "confidence": lambda: 1.0 - prob_label.mean(axis=0),
        "learning_speed": lambda: 1.0 - correct.mean(axis=0),
    }
    return {kind: np.asarray(derive[kind](), dtype=np.float64) for kind in check_kinds(kinds)}


def proxy_cache_path(cfg: ExperimentConfig) -> Path:
    name = f"{cfg.data.name}-{cfg.model.name}-{cfg.optimizer.tag}-s{cfg.seed}-{cfg.training_hash()}.npz"
    return Path(cfg.output_dir) / "memorization" / "proxies" / name


def record_training(cfg: ExperimentConfig, bundle=None, *, quiet: bool = True) -> dict[str, np.ndarray]:
    """Train once on the full training set, recording per-epoch label probability,
    loss and correctness of every training example (arrays ``[epochs, n_train]``)."""
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs={cfg.train.epochs} leaves nothing to record; proxies need >= 1 epoch")
    bundle = bundle if bundle is not None else build_dataset(cfg.data, cfg.seed)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
    phase = Phase("proxy", [Objective("ce", "train", cross_entropy, sam=sam_spec(cfg.optimizer))])
    records: dict[str, list[np.ndarray]] = {"prob_label": [], "loss": [], "correct": []}

    def evaluate(model, epoch):
        out = predict(model, bundle.train_eval, cfg.data.eval_batch_size, device)
        logp = torch.log_softmax(out["logits"].double(), dim=1)
        label_logp = logp.gather(1, out["labels"][:, None]).squeeze(1)
        correct = out["logits"].argmax(1) == out["labels"]
        records["prob_label"].append(label_logp.exp().numpy())
        records["loss"].append(F.nll_loss(logp, out["labels"], reduction="none").numpy())
        records["correct"].append(correct.numpy())
        return {"train_acc": 100.0 * float(correct.float().mean())}

    # every epoch must be measured, whatever the recipe's eval cadence
    train_cfg = dataclasses.replace(cfg.train, eval_every=1)
    run_stage(model, lambda epoch: [phase], {"train": bundle.train},
              cfg=dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, enabled=False)),
              optimizer_cfg=cfg.optimizer, train_cfg=train_cfg, epochs=cfg.train.epochs, device=device,
              checkpoint_path=None, evaluate=evaluate, quiet=quiet, description="memorization proxies",
              resume=False)
    return {"prob_label": np.stack(records["prob_label"]), "loss": np.stack(records["loss"]),
            "correct": np.stack(records["correct"]).astype(bool)}


def compute_proxy_scores(cfg: ExperimentConfig, bundle=None, kinds: Sequence[str] = PROXY_KINDS, *,
                         quiet: bool = True, use_cache: bool = True) -> dict[str, np.ndarray]:
    """Proxy memorization scores, one array per kind, aligned with training positions.

    One training run with ``cfg``'s recipe (cached by training hash under
    ``cfg.output_dir``); higher = more memorized for every kind.
    """
    kinds = check_kinds(kinds)
    path = proxy_cache_path(cfg)
    records = None
    if use_cache and path.is_file():
        unreadable = (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile)
        with contextlib.suppress(*unreadable), np.load(path, allow_pickle=False) as data:
            records = {k: data[k] for k in ("prob_label", "loss", "correct")}
    if records is not None and bundle is not None and records["loss"].shape[1] != len(bundle.train_eval):
        records = None  # a cache from another version of the data set
    if records is None:
        records = record_training(cfg, bundle, quiet=quiet)
        if use_cache:
            with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, **records)
    return proxies_from_records(records["prob_label"], records["loss"], records["correct"], kinds)
