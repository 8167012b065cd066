"""Pretraining (SGD, SAM or ASAM) and training from scratch on a subset (the retrain reference)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from sharp_unlearn.config import ExperimentConfig
from sharp_unlearn.data import DatasetBundle, build_dataset
from sharp_unlearn.engine.checkpoint import load_checkpoint
from sharp_unlearn.engine.driver import LocalBackend, resolve_device
from sharp_unlearn.recipes.distributed import launch_deepspeed
from sharp_unlearn.recipes.stages import TrainOutcome, stage_meta, train_stage
from sharp_unlearn.stage_checkpoints import stage_dir


def train_from_scratch(cfg: ExperimentConfig, bundle: DatasetBundle | None = None, *,
                       train_indices: np.ndarray | None = None, split_hash: str | None = None,
                       kind: str = "pretrain", tags: Mapping[str, Any] | None = None,
                       quiet: bool = False, resume: bool = True, use_cache: bool = True,
                       epoch_callback: Callable[[int, dict[str, float]], None] | None = None) -> TrainOutcome:
    """Train a fresh model with the configured recipe, on all training data or a subset.

    A completed checkpoint with the same training hash (and split hash) is
    reused without training: that is the retrain-reference cache.
    ``epoch_callback(epoch, record)`` runs after each epoch's checkpoint
    (``stage_dir(...)/checkpoint.pt``) is written (sweep trials report it).
    """
    if cfg.distributed.backend == "deepspeed":  # ZeRO-sharded on N workers: recipes/distributed.py
        return launch_deepspeed(cfg, train_indices=train_indices, split_hash=split_hash, kind=kind, tags=tags,
                                quiet=quiet, resume=resume, use_cache=use_cache, epoch_callback=epoch_callback)
    bundle = bundle or build_dataset(cfg.data, cfg.seed)  # bad data fails before anything is written
    kwargs = dict(train_indices=train_indices, split_hash=split_hash, kind=kind, tags=tags, quiet=quiet,
                  resume=resume, use_cache=use_cache, epoch_callback=epoch_callback)
    if not use_cache:
        return _train_local(cfg, bundle, **kwargs)
    # Two runs needing the same cached model (two methods unlearning one split, in parallel) must
    # not both train it: the second waits here, then finds the first's completed checkpoint. The
    # lock sits next to the cache folder so it also holds across machines sharing output_dir.
    from filelock import FileLock

    out_dir = stage_dir(cfg, kind, split_hash)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out_dir.parent / f".{out_dir.name}.lock"):
        return _train_local(cfg, bundle, **kwargs)


def _train_local(cfg: ExperimentConfig, bundle: DatasetBundle, *, train_indices: np.ndarray | None,
                 split_hash: str | None, kind: str, tags: Mapping[str, Any] | None, quiet: bool, resume: bool,
                 use_cache: bool, epoch_callback: Callable[[int, dict[str, float]], None] | None) -> TrainOutcome:
    out_dir = stage_dir(cfg, kind, split_hash)
    ckpt_path = out_dir / "checkpoint.pt"
    meta = stage_meta(cfg, bundle, kind, split_hash, cfg.training_hash())
    if use_cache and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if (state.get("completed") and state.get("config_hash") == meta["config_hash"]
                and state.get("split_hash") == meta["split_hash"]):
            return TrainOutcome(ckpt_path, dict(state.get("final_metrics", {})), state.get("run_id"),
                                cached=True, wall_seconds=float(state.get("wall_seconds", 0.0)),
                                history=list(state.get("history", [])))
    backend = LocalBackend(resolve_device(cfg.device), ckpt_path)
    return train_stage(cfg, bundle, backend, out_dir=out_dir, checkpoint_path=ckpt_path, meta=meta,
                       train_indices=train_indices, split_hash=split_hash, kind=kind, tags=tags, quiet=quiet,
                       resume=resume, epoch_callback=epoch_callback)
