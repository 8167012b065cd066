"""The stages both a single process and every rank of a sharded run execute.

:func:`train_stage` trains a fresh model (pretraining, or the retrained reference on a subset);
:func:`unlearn_stage` runs an unlearning method's phases; :func:`load_pretrained` rebuilds a
pretrained checkpoint with its data and :func:`epoch_evaluator` measures each epoch against the
reference. ``recipes.pretrain`` and ``recipes.unlearn`` run them on one device;
``recipes.distributed``'s workers run them on the DeepSpeed backend, so they live below all three.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from sharp_unlearn.config import ExperimentConfig, config_from_dict
from sharp_unlearn.data import DatasetBundle, build_dataset
from sharp_unlearn.data.forget import ForgetSplit, memorization_groups
from sharp_unlearn.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from sharp_unlearn.engine.driver import Backend, LocalBackend, StageResult, run_epochs
from sharp_unlearn.engine.loop import accuracy
from sharp_unlearn.engine.objective import Objective, Phase
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.methods import UnlearnContext, UnlearningMethod
from sharp_unlearn.metrics.accuracy import split_accuracies, subset
from sharp_unlearn.metrics.tow import forget_gap, tow
from sharp_unlearn.model_store import is_model_uri, log_model, resolve_checkpoint
from sharp_unlearn.models import build_model
from sharp_unlearn.models.sources import model_tags
from sharp_unlearn.optim.factory import sam_spec
from sharp_unlearn.stage_checkpoints import load_trained_model
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


def stage_meta(cfg: ExperimentConfig, bundle: DatasetBundle, kind: str, split_hash: str | None,
               config_hash: str) -> dict[str, Any]:
    """What a training stage's checkpoint records beside the weights (the cache matches on the hashes)."""
    return {"config_hash": config_hash, "split_hash": split_hash or "full", "kind": kind,
            "model_name": cfg.model.name, "dataset": cfg.data.name, "num_classes": bundle.num_classes,
            "input_shape": list(bundle.input_shape)}


def train_stage(cfg: ExperimentConfig, bundle: DatasetBundle, backend: Backend, *, out_dir: Path,
                checkpoint_path: Path, meta: dict[str, Any], train_indices: Sequence[int] | np.ndarray | None,
                split_hash: str | None, kind: str, tags: Mapping[str, Any] | None, quiet: bool, resume: bool,
                epoch_callback: Callable[[int, dict[str, float]], None] | None,
                build_context: contextlib.AbstractContextManager | None = None) -> TrainOutcome:
    """Train a fresh model on ``backend`` (one device, or every rank of a sharded run), evaluate it,
    record its final metrics in the checkpoint ``checkpoint_path`` (which the backend writes) and log
    the run. With several ranks all call this; rank 0 writes the files. ``build_context``: the context
    the model is built in (a sharded run's ``DeepSpeedBackend.model_construction``)."""
    writer = backend.rank == 0
    ckpt_path = checkpoint_path
    train = bundle.train if train_indices is None else Subset(bundle.train, np.asarray(train_indices).tolist())
    train_eval = (bundle.train_eval if train_indices is None
                  else Subset(bundle.train_eval, np.asarray(train_indices).tolist()))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, and as a single process
    with build_context or contextlib.nullcontext():
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
                # a sharded model is not whole on any rank: log the consolidated checkpoint's weights
                whole = model if isinstance(backend, LocalBackend) else load_trained_model(ckpt_path, cfg)[0]
                log_model(tracker, whole, ckpt_path, cfg, bundle.test)
    return TrainOutcome(ckpt_path, metrics, tracker.run_id, cached=False, wall_seconds=result.wall_seconds,
                        history=result.history, resumed_from=result.resumed_from)


@dataclass
class Pretrained:
    """A pretrained checkpoint, its config, and the data it was trained on."""

    path: Path
    cfg: ExperimentConfig
    state: dict[str, Any]
    bundle: DatasetBundle

    @property
    def run_id(self) -> str | None:
        return self.state.get("run_id")

    def model(self, device) -> torch.nn.Module:
        model = build_model(self.cfg.model, self.bundle.num_classes, self.bundle.input_shape)
        load_model_state(model, self.state["model"], f"checkpoint {str(self.path)!r}")
        return model.to(device)


def load_pretrained(path: str | Path, bundle: DatasetBundle | None = None) -> Pretrained:
    if is_model_uri(path):  # runs:/<id>/model or models:/<name>/<version>: from $MLFLOW_TRACKING_URI's store
        path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    if "config" not in state:
        raise ConfigError(f"checkpoint {str(path)!r} carries no config; expected a sharp-unlearn checkpoint")
    cfg = config_from_dict(state["config"])
    bundle = bundle or build_dataset(cfg.data, cfg.seed)
    return Pretrained(Path(path), cfg, state, bundle)


def unlearn_stage(cfg: ExperimentConfig, model: torch.nn.Module, bundle: DatasetBundle, split: ForgetSplit,
                  method: UnlearningMethod, backend: Backend, *, checkpoint_meta: dict[str, Any],
                  evaluate: Callable[[Any, int], dict[str, float]] | None = None, tracker=None,
                  quiet: bool = False, resume: bool = True,
                  on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> StageResult:
    """Prepare ``method`` on the whole model (saliency masks, SCRUB's teacher: before a sharded
    backend partitions it), then run its phases on ``backend``; every rank of a sharded run calls this."""
    retain_ds = subset(bundle.train, split.retain_positions)
    forget_ds = subset(bundle.train, split.forget_positions)
    # batch_size is the global batch the phases see (each rank of a sharded run trains on its slice)
    ctx = UnlearnContext(model=model, retain=retain_ds, forget=forget_ds, num_classes=bundle.num_classes,
                         device=backend.device, seed=cfg.seed, batch_size=cfg.data.batch_size * backend.world_size,
                         extras={"forget_scores": None if split.scores is None
                                 else split.scores[split.forget_positions],
                                 "bundle": bundle, "split": split, "config": cfg},
                         forget_eval=subset(bundle.train_eval, split.forget_positions))
    datasets = {"retain": retain_ds, "forget": forget_ds}
    prepare_streams = method.prepare(ctx)
    if isinstance(prepare_streams, dict):  # a method may add streams (e.g. RUM's groups)
        datasets.update(prepare_streams)
    return run_epochs(model, method.phases, datasets, backend=backend, cfg=cfg, optimizer_cfg=cfg.optimizer,
                      train_cfg=cfg.train, epochs=method.epochs, checkpoint_meta=checkpoint_meta,
                      evaluate=evaluate, tracker=tracker, quiet=quiet,
                      description=f"unlearn {cfg.method.name}/{method.optimizer_tag}", resume=resume,
                      on_epoch_end=on_epoch_end)


def epoch_evaluator(bundle: DatasetBundle, split: ForgetSplit, reference_metrics: dict[str, float],
                    device, eval_batch_size: int) -> Callable[[Any, int], dict[str, float]]:
    """``evaluate(model, epoch)`` for the engine: retain/forget/val/test accuracy (and per memorization
    level), ``tow`` and ``forget_gap`` against the reference.

    A sharded stage passes a model that splits each batch's rows over the ranks
    (``RowShardedModel``): the same code then gives the same numbers on every rank.
    """
    groups = memorization_groups(split.scores, split.forget_positions) if split.scores is not None else None

    def evaluate(model, epoch: int) -> dict[str, float]:
        record = split_accuracies(model, bundle, split.forget_positions, split.retain_positions,
                                  device, eval_batch_size, groups)
        record["tow"] = tow(record, reference_metrics)
        record["forget_gap"] = forget_gap(record, reference_metrics)
        return record

    return evaluate
