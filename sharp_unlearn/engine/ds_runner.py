"""Run a training stage inside DeepSpeed: epochs, sharded checkpoints, resume, fp32 export.

The DeepSpeed counterpart of :func:`sharp_unlearn.engine.runner.run_stage`,
called on every rank with the same arguments. Differences that matter:

* data: each stream yields *global* batches of ``data.batch_size * N`` (the
  same order a single process with that batch size would see); each rank
  trains on its slice (:class:`DeepSpeedTrainer`).
* checkpoints: DeepSpeed's sharded format under ``sharded_dir/<tag>/``
  (every rank writes its partition), committed by ``progress.json`` which
  rank 0 writes atomically only after every rank finished writing; the newest
  two tags are kept. ``--resume`` continues from the committed tag.
* export: at the end rank 0 writes the project's single-file checkpoint
  (:func:`save_checkpoint`) with full fp32 weights, consolidated from the
  shards, which every single-device command loads.
* evaluation is sharded too (each rank scores a slice, counts are
  all-reduced), and runs on all ranks because ZeRO-3 forwards are collective.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from sharp_unlearn.config import ExperimentConfig, OptimizerConfig, TrainConfig
from sharp_unlearn.engine.checkpoint import save_checkpoint
from sharp_unlearn.engine.deepspeed_engine import (
    DeepSpeedTrainer,
    EngineModel,
    apply_group_timeout,
    barrier,
    split_rows,
)
from sharp_unlearn.engine.determinism import apply_determinism
from sharp_unlearn.engine.loop import Timer, accuracy, epoch_seed, make_loader
from sharp_unlearn.engine.objective import Phase
from sharp_unlearn.engine.runner import StageResult
from sharp_unlearn.errors import require
from sharp_unlearn.optim.factory import build_base_optimizer, build_scheduler
from sharp_unlearn.progress import progress_bar
from sharp_unlearn.tracking import NullTracker

PROGRESS_FILE = "progress.json"
KEEP_TAGS = 2


@dataclass
class DeepSpeedStageResult(StageResult):
    #: the engine, still initialised: evaluate with ``distributed_accuracy(engine.module, ...)``
    engine: Any = None


# ---------------------------------------------------------------- evaluation
class RowShardedModel:
    """A model for the single-process evaluation code (``predict``, ``accuracy``,
    ``split_accuracies``) that runs each batch's rows split over the ranks.

    Every rank calls it with the same full batch; each runs only its rows
    through the engine's module (ZeRO-3 gathers parameters layer by layer in
    that forward, as in training) and the logits are all-gathered, so every
    rank returns the whole batch's logits. Only logits (rows x classes) cross
    ranks, never weights, and the metric code itself is the single-process
    code, so its numbers are the same for the same weights. Every rank runs
    the same number of forwards (an empty slice still runs one), which
    ZeRO-3's collective parameter gathering requires.
    """

    def __init__(self, model):
        self.module = model._engine.module if isinstance(model, EngineModel) else model

    def eval(self) -> RowShardedModel:
        self.module.eval()
        return self

    def train(self, mode: bool = True) -> RowShardedModel:
        self.module.train(mode)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        total = len(x)
        start, count = split_rows(total, world, rank)
        local = x[start:start + count]
        if local.is_floating_point():
            local = local.to(next(self.module.parameters()).dtype)  # bf16 engines need bf16 inputs
        logits = self.module(local)
        # all_gather wants equal sizes: pad every slice to the largest (slices differ by at most one row)
        width = split_rows(total, world, 0)[1]
        padded = logits.new_zeros((width, *logits.shape[1:]))
        padded[:count] = logits
        pieces = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(pieces, padded.contiguous())
        return torch.cat([piece[:split_rows(total, world, r)[1]] for r, piece in enumerate(pieces)])


def distributed_accuracy(model, dataset: Dataset, batch_size: int, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy in percent over ``dataset`` (all ranks call it), each rank scoring a slice of every batch.

    ``model`` is the engine's module (or an :class:`EngineModel`); the number equals
    :func:`~sharp_unlearn.engine.loop.accuracy` on the same weights.
    """
    sharded = RowShardedModel(model)
    was_training = sharded.module.training
    value = accuracy(sharded, dataset, batch_size, device)
    sharded.train(was_training)
    return value


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics).

    Each rank's BatchNorm sees only its slice of the batch, so running
    statistics drift apart; like DDP (``broadcast_buffers``), rank 0's are the
    model's: evaluation on every rank and the exported checkpoint then agree.
    """
    for buffer in module.buffers():
        torch.distributed.broadcast(buffer.data, src=src)


# ---------------------------------------------------------------- checkpoints
def read_progress(sharded_dir: Path) -> dict[str, Any] | None:
    path = Path(sharded_dir) / PROGRESS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def consolidated_state_dict(engine, sharded_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights (and buffers) from the sharded checkpoint ``tag`` (rank 0 only)."""
    if int(engine.zero_optimization_stage()) == 0:
        # no partitions: the module on rank 0 holds every weight (fp32: bf16 needs stage >= 1)
        return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(sharded_dir), tag=tag)
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


# ---------------------------------------------------------------- the stage
def run_deepspeed_stage(
    model: nn.Module,
    phases_fn: Callable[[int], list[Phase]],
    datasets: Mapping[str, Dataset],
    *,
    cfg: ExperimentConfig,
    optimizer_cfg: OptimizerConfig,
    train_cfg: TrainConfig,
    epochs: int,
    ds_config: dict[str, Any],
    device: torch.device,
    sharded_dir: Path,
    export_path: Path | None,
    checkpoint_meta: Mapping[str, Any] | None = None,
    evaluate: Callable[[Any, int], dict[str, float]] | None = None,
    tracker: NullTracker | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    quiet: bool = False,
    description: str = "train",
    resume: bool = True,
) -> DeepSpeedStageResult:
    """Train ``model`` under DeepSpeed for ``epochs`` epochs of ``phases_fn(epoch)`` (all ranks call this).

    ``evaluate(model, epoch)`` runs on every rank (use :func:`distributed_accuracy`);
    ``on_epoch_end(epoch, record)`` too, after the epoch's checkpoint is committed
    (e.g. ``ray.train.report``, which every worker must call).
    Returns the export path as ``checkpoint``; ``resumed_from`` is the epoch resumed at.
    """
    deepspeed = require("deepspeed", "deepspeed")
    tracker = tracker or NullTracker()
    apply_determinism(cfg)  # each worker is its own process: threads and kernels are fixed here too
    meta = dict(checkpoint_meta or {})
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sharded_dir = Path(sharded_dir)
    global_batch = cfg.data.batch_size * world
    seed = cfg.seed
    model.to(device)

    def stream_factory(name: str, salt: int, epoch: int):
        dataset = datasets[name]
        return lambda pass_no: make_loader(dataset, global_batch, shuffle=True, seed=seed,
                                           epoch=epoch * 1000 + pass_no, salt=salt,
                                           num_workers=cfg.data.num_workers)

    first_phases = phases_fn(0) if epochs > 0 else []
    steps_per_epoch = sum(
        min(math.ceil(math.ceil(len(datasets[p.driver_stream]) / global_batch) / train_cfg.grad_accum),
            p.max_steps or 10**12) for p in first_phases) if first_phases else 1
    optimizer = build_base_optimizer(model.parameters(), optimizer_cfg)
    scheduler = build_scheduler(optimizer, train_cfg, max(1, steps_per_epoch), epochs)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    apply_group_timeout(cfg.distributed.timeout_s)  # DeepSpeed's own groups too: a frozen peer fails the run
    trainer = DeepSpeedTrainer(engine, device=device, grad_accum=train_cfg.grad_accum)

    start_epoch, history = 0, []
    progress = read_progress(sharded_dir) if resume else None
    if (progress and progress.get("config_hash") == meta.get("config_hash") and not progress.get("completed")
            and (sharded_dir / progress["tag"]).is_dir()):
        engine.load_checkpoint(str(sharded_dir), tag=progress["tag"], load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        start_epoch = int(progress["epoch"])
        history = list(progress.get("history", []))

    def save(epoch: int, completed: bool) -> str:
        tag = f"epoch{epoch:04d}"
        engine.save_checkpoint(str(sharded_dir), tag=tag, save_latest=False,
                               client_state={"epoch": epoch, "config_hash": meta.get("config_hash")})
        # save_checkpoint ends with a barrier: every rank's shard is on disk; now commit
        if rank == 0:
            record = {"tag": tag, "epoch": epoch, "completed": completed, "history": history,
                      "config_hash": meta.get("config_hash"), "world_size": world,
                      "zero_stage": int(engine.zero_optimization_stage())}
            _write_atomic(sharded_dir / PROGRESS_FILE, json.dumps(record, indent=1))
            _write_atomic(sharded_dir / "latest", tag)  # what DeepSpeed's own tools read
            tags = sorted(p.name for p in sharded_dir.glob("epoch*") if p.is_dir())
            for old in tags[:-KEEP_TAGS]:
                shutil.rmtree(sharded_dir / old, ignore_errors=True)
        barrier()
        return tag

    timer = Timer()
    stream_salts = {name: i + 1 for i, name in enumerate(sorted(datasets))}
    with progress_bar(description, max(epochs - start_epoch, 0), quiet or rank != 0) as advance:
        for epoch in range(start_epoch, epochs):
            torch.manual_seed(epoch_seed(seed, epoch, 99))  # dropout / augmentation, resume-stable
            record: dict[str, float] = {"epoch": epoch + 1}
            phases = phases_fn(epoch)
            for phase in phases:
                streams = {name: stream_factory(name, stream_salts[name], epoch) for name in datasets}
                losses = trainer.run_phase(phase, streams)
                for key, value in losses.items():
                    record[f"loss_{phase.name}_{key}" if len(phases) > 1 else f"loss_{key}"] = value
            record["train_loss"] = float(sum(v for k, v in record.items() if k.startswith("loss_")))
            record["lr"] = optimizer.param_groups[0]["lr"]
            broadcast_buffers(engine.module)  # before evaluating and saving: one set of BatchNorm statistics
            last = epoch + 1 == epochs
            if evaluate is not None and (last or (train_cfg.eval_every and (epoch + 1) % train_cfg.eval_every == 0)):
                record.update(evaluate(trainer.proxy, epoch + 1))
            history.append(record)
            tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
            if not last and train_cfg.checkpoint_every and (epoch + 1) % train_cfg.checkpoint_every == 0:
                save(epoch + 1, completed=False)
            if on_epoch_end is not None and not last:
                on_epoch_end(epoch + 1, record)
            advance(status=f"loss {record['train_loss']:.3f}")
    final_tag = save(epochs, completed=True)
    if on_epoch_end is not None and history and int(history[-1]["epoch"]) == epochs:
        on_epoch_end(epochs, history[-1])
    if export_path is not None and rank == 0:
        save_checkpoint(export_path, {
            **meta,
            "model": consolidated_state_dict(engine, sharded_dir, final_tag),
            "epoch": epochs,
            "completed": True,
            "history": history,
            "config": cfg.to_dict(),
            "resumed_from": start_epoch,
            "sharded_checkpoint": str(sharded_dir / final_tag),
        })
    barrier()
    return DeepSpeedStageResult(export_path, history, timer.seconds, start_epoch, engine=engine)
