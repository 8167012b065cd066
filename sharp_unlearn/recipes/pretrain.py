"""Pretraining (SGD, SAM or ASAM) and training from scratch on a subset (the retrain reference)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from sharp_unlearn.config import ExperimentConfig
from sharp_unlearn.data import DatasetBundle, build_dataset
from sharp_unlearn.engine.checkpoint import load_checkpoint, save_checkpoint
from sharp_unlearn.engine.driver import Backend, LocalBackend, resolve_device, run_epochs
from sharp_unlearn.engine.loop import accuracy
from sharp_unlearn.engine.objective import Objective, Phase
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.models import build_model
from sharp_unlearn.models.sources import model_tags, path_safe_name
from sharp_unlearn.optim.factory import sam_spec
from sharp_unlearn.tracking import open_run


@dataclass
class TrainOutcome:
    checkpoint: Path
    metrics: dict[str, float]
    run_id: str | None
    cached: bool
    wall_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    #: the epoch a resumed stage continued from (0: trained from the start)
    resumed_from: int = 0


def stage_dir(cfg: ExperimentConfig, kind: str, split_hash: str | None = None) -> Path:
    name = f"{cfg.data.name}-{path_safe_name(cfg.model.name)}-{cfg.optimizer.tag}-s{cfg.seed}-{cfg.training_hash()}"
    if split_hash:
        name += f"-{split_hash}"
    return Path(cfg.output_dir) / kind / name


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
        from sharp_unlearn.recipes.distributed import launch_deepspeed

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


def stage_meta(cfg: ExperimentConfig, bundle: DatasetBundle, kind: str, split_hash: str | None,
               config_hash: str) -> dict[str, Any]:
    """What a training stage's checkpoint records beside the weights (the cache matches on the hashes)."""
    return {"config_hash": config_hash, "split_hash": split_hash or "full", "kind": kind,
            "model_name": cfg.model.name, "dataset": cfg.data.name, "num_classes": bundle.num_classes,
            "input_shape": list(bundle.input_shape)}


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


def train_stage(cfg: ExperimentConfig, bundle: DatasetBundle, backend: Backend, *, out_dir: Path,
                checkpoint_path: Path, meta: dict[str, Any], train_indices: Sequence[int] | np.ndarray | None,
                split_hash: str | None, kind: str, tags: Mapping[str, Any] | None, quiet: bool, resume: bool,
                epoch_callback: Callable[[int, dict[str, float]], None] | None) -> TrainOutcome:
    """Train a fresh model on ``backend`` (one device, or every rank of a sharded run), evaluate it,
    record its final metrics in the checkpoint ``checkpoint_path`` (which the backend writes) and log
    the run. With several ranks all call this; rank 0 writes the files."""
    writer = backend.rank == 0
    ckpt_path = checkpoint_path
    train = bundle.train if train_indices is None else Subset(bundle.train, np.asarray(train_indices).tolist())
    train_eval = (bundle.train_eval if train_indices is None
                  else Subset(bundle.train_eval, np.asarray(train_indices).tolist()))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, and as a single process
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
    spec = sam_spec(cfg.optimizer)
    phase = Phase(kind, [Objective("ce", "train", cross_entropy, sam=spec)])
    eval_bs = cfg.data.eval_batch_size
    device = backend.device

    def evaluate(model, epoch):
        return {"val_acc": accuracy(model, bundle.val, eval_bs, device)}

    run_tags = {"optimizer": cfg.optimizer.tag, "split_hash": split_hash, **model_tags(cfg.model, kind),
                **(tags or {})}

    def on_epoch_end(epoch: int, record: dict[str, float]) -> None:
        # the run folder appears with the first checkpoint (something to resume), not before:
        # a run that fails before its first epoch leaves no config.yaml-only folder behind
        if writer and ckpt_path.exists() and not (out_dir / "config.yaml").exists():
            (out_dir / "config.yaml").write_text(cfg.to_yaml())
        if epoch_callback is not None:
            epoch_callback(epoch, record)

    # unique within a grid: a retrain reference names the pretraining optimizer and the forget set
    run_name = f"{kind}-{cfg.optimizer.tag}"
    if (tags or {}).get("forget_set"):
        run_name = f"pre-{cfg.optimizer.tag}/{kind}/{tags['forget_set']}"
    if cfg.seed:
        run_name += f"/s{cfg.seed}"
    with open_run(cfg, kind=kind, tags=run_tags, run_name=run_name) as tracker:
        meta["run_id"] = tracker.run_id
        result = run_epochs(model, lambda epoch: [phase], {"train": train}, backend=backend, cfg=cfg,
                            optimizer_cfg=cfg.optimizer, train_cfg=cfg.train, epochs=cfg.train.epochs,
                            checkpoint_meta=meta, evaluate=evaluate, tracker=tracker, quiet=quiet,
                            description=f"{kind} {cfg.model.name}/{cfg.optimizer.tag}", resume=resume,
                            on_epoch_end=on_epoch_end)
        if writer:
            (out_dir / "config.yaml").write_text(cfg.to_yaml())
        scored = backend.eval_model
        metrics = {
            "train_acc": accuracy(scored, train_eval, eval_bs, device),
            "val_acc": accuracy(scored, bundle.val, eval_bs, device),
            "test_acc": accuracy(scored, bundle.test, eval_bs, device),
            "train_loss": result.history[-1]["train_loss"] if result.history else float("nan"),
            "wall_seconds": result.wall_seconds,
        }
        tracker.log_metrics(metrics)
        if writer:
            # record the final metrics inside the checkpoint so a cache hit can report them
            state = load_checkpoint(ckpt_path)
            state.update(final_metrics=metrics, wall_seconds=result.wall_seconds, run_id=tracker.run_id)
            save_checkpoint(ckpt_path, {k: v for k, v in state.items() if k != "format_version"})
            tracker.log_artifact(out_dir / "config.yaml")
            tracker.log_artifact(ckpt_path, "checkpoint")
            if tracker.run_id is not None:
                from sharp_unlearn.model_store import log_model

                # a sharded model is not whole on any rank: log the consolidated checkpoint's weights
                whole = model if isinstance(backend, LocalBackend) else load_trained_model(ckpt_path, cfg)[0]
                log_model(tracker, whole, ckpt_path, cfg, bundle.test)
    return TrainOutcome(ckpt_path, metrics, tracker.run_id, cached=False, wall_seconds=result.wall_seconds,
                        history=result.history, resumed_from=result.resumed_from)


def load_trained_model(path: str | Path, cfg: ExperimentConfig | None = None, device: str | torch.device = "cpu"):
    """Rebuild a model from a checkpoint (its own saved config unless ``cfg`` is given)."""
    from sharp_unlearn.config import config_from_dict
    from sharp_unlearn.engine.checkpoint import load_model_state

    state = load_checkpoint(path, map_location=device)
    saved_cfg = config_from_dict(state["config"]) if "config" in state else None
    cfg = cfg or saved_cfg
    if cfg is None:
        from sharp_unlearn.errors import ConfigError

        raise ConfigError(f"checkpoint {str(path)!r} carries no config; pass one")
    num_classes = int(state.get("num_classes", 0)) or None
    input_shape = tuple(state.get("input_shape", ())) or None
    if num_classes is None or input_shape is None:
        bundle = build_dataset(cfg.data, cfg.seed)
        num_classes, input_shape = bundle.num_classes, bundle.input_shape
    model = build_model(cfg.model, num_classes, input_shape)
    load_model_state(model, state["model"], f"checkpoint {str(path)!r}")
    return model.to(device), cfg, state
