"""Trained checkpoints on disk: where a training stage keeps its checkpoint, and the model one holds.

:func:`stage_dir` is the folder of a pretraining or retraining stage (named by data set, model,
optimizer, seed, training hash and split hash: the retrained-reference cache key);
:func:`load_trained_model` rebuilds the model a checkpoint holds. The recipes write these
checkpoints and ``evaluate`` reads them, so both live here, below either.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sharp_unlearn.config import ExperimentConfig, config_from_dict
from sharp_unlearn.data import build_dataset
from sharp_unlearn.engine.checkpoint import load_checkpoint, load_model_state
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models import build_model
from sharp_unlearn.models.sources import path_safe_name


def stage_dir(cfg: ExperimentConfig, kind: str, split_hash: str | None = None) -> Path:
    name = f"{cfg.data.name}-{path_safe_name(cfg.model.name)}-{cfg.optimizer.tag}-s{cfg.seed}-{cfg.training_hash()}"
    if split_hash:
        name += f"-{split_hash}"
    return Path(cfg.output_dir) / kind / name


def load_trained_model(path: str | Path, cfg: ExperimentConfig | None = None, device: str | torch.device = "cpu"):
    """Rebuild a model from a checkpoint (its own saved config unless ``cfg`` is given)."""
    state = load_checkpoint(path, map_location=device)
    saved_cfg = config_from_dict(state["config"]) if "config" in state else None
    cfg = cfg or saved_cfg
    if cfg is None:
        raise ConfigError(f"checkpoint {str(path)!r} carries no config; pass one")
    num_classes = int(state.get("num_classes", 0)) or None
    input_shape = tuple(state.get("input_shape", ())) or None
    if num_classes is None or input_shape is None:
        bundle = build_dataset(cfg.data, cfg.seed)
        num_classes, input_shape = bundle.num_classes, bundle.input_shape
    model = build_model(cfg.model, num_classes, input_shape)
    load_model_state(model, state["model"], f"checkpoint {str(path)!r}")
    return model.to(device), cfg, state
