"""The DeepSpeed backend of the epoch driver: sharded checkpoints, resume, fp32 export.

:class:`DeepSpeedBackend` runs a stage of :func:`sharp_unlearn.engine.driver.run_epochs`
on N ranks (every rank calls the driver with the same arguments). What differs
from one device:

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
* evaluation is sharded too (:class:`RowShardedModel`: each rank runs its rows
  of every batch, the logits are gathered), on all ranks because ZeRO-3
  forwards are collective.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from sharp_unlearn.engine.checkpoint import save_checkpoint
from sharp_unlearn.engine.deepspeed_engine import (
    DeepSpeedTrainer,
    EngineModel,
    apply_group_timeout,
    barrier,
    split_rows,
)
from sharp_unlearn.engine.driver import Resumed, StageState
from sharp_unlearn.engine.loop import accuracy
from sharp_unlearn.errors import require
from sharp_unlearn.files import atomic_write

PROGRESS_FILE = "progress.json"
KEEP_TAGS = 2


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
        if isinstance(model, RowShardedModel):
            model = model.module
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


def consolidated_state_dict(engine, sharded_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights (and buffers) from the sharded checkpoint ``tag`` (rank 0 only)."""
    if int(engine.zero_optimization_stage()) == 0:
        # no partitions: the module on rank 0 holds every weight (fp32: bf16 needs stage >= 1)
        return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(sharded_dir), tag=tag)
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


# ---------------------------------------------------------------- the backend
class DeepSpeedBackend:
    """N ranks, ZeRO stage 0-3: :class:`DeepSpeedTrainer`, sharded checkpoints under ``sharded_dir``
    and, at the end, the consolidated fp32 export at ``export_path`` (rank 0 writes it).

    ``engine`` is the initialised engine after the stage (``engine.destroy()`` when done).
    """

    def __init__(self, ds_config: dict[str, Any], device: torch.device, sharded_dir: Path,
                 export_path: Path | None = None, *, timeout_s: float | None = None):
        self.ds_config = ds_config
        self.device = device
        self.sharded_dir = Path(sharded_dir)
        self.export_path = export_path
        self.timeout_s = timeout_s
        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.engine = None
        self.resumed_from = 0

    def model_construction(self, model_cfg) -> contextlib.AbstractContextManager:
        """The context a stage's model is built in. Under ZeRO-3 with ``model.weights`` it is
        ``deepspeed.zero.Init``: each parameter is partitioned as soon as its module is built, so no
        rank ever holds the whole model, and the weights file is loaded module by module
        (:func:`~sharp_unlearn.models.base.load_model_state`). From scratch the model is built whole
        as before: a constructor that re-initialises its built children (ResNets, ViTs) would reach
        only empty partitions, and the initial weights would no longer be a single process's."""
        stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        if stage != 3 or not model_cfg.weights:
            return contextlib.nullcontext()
        deepspeed = require("deepspeed", "deepspeed")
        # the run's config gives the parameters' dtype (fp16 / bf16 / fp32) and the partitioning settings
        return deepspeed.zero.Init(config_dict_or_path=self.ds_config,
                                   data_parallel_group=torch.distributed.group.WORLD)

    def start(self, model, optimizer, scheduler, train_cfg, cfg) -> DeepSpeedTrainer:
        deepspeed = require("deepspeed", "deepspeed")
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=self.ds_config)
        # DeepSpeed's own groups too: a frozen peer fails the run
        apply_group_timeout(self.timeout_s if self.timeout_s is not None else cfg.distributed.timeout_s)
        return DeepSpeedTrainer(self.engine, device=self.device, grad_accum=train_cfg.grad_accum)

    @property
    def eval_model(self) -> RowShardedModel:
        return RowShardedModel(self.engine.module)

    def resume(self, meta) -> Resumed | None:
        progress = read_progress(self.sharded_dir)
        if not (progress and progress.get("config_hash") == meta.get("config_hash") and not progress.get("completed")
                and (self.sharded_dir / progress["tag"]).is_dir()):
            return None
        self.engine.load_checkpoint(str(self.sharded_dir), tag=progress["tag"], load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
        self.resumed_from = int(progress["epoch"])
        return Resumed(self.resumed_from, list(progress.get("history", [])),
                       float(progress.get("wall_seconds", 0.0)))

    def sync(self) -> None:
        broadcast_buffers(self.engine.module)  # one set of BatchNorm statistics for evaluating and saving

    def _save(self, state: StageState) -> str:
        engine, sharded_dir = self.engine, self.sharded_dir
        tag = f"epoch{state.epoch:04d}"
        engine.save_checkpoint(str(sharded_dir), tag=tag, save_latest=False,
                               client_state={"epoch": state.epoch, "config_hash": state.meta.get("config_hash")})
        # save_checkpoint ends with a barrier: every rank's shard is on disk; now commit
        if self.rank == 0:
            record = {"tag": tag, "epoch": state.epoch, "completed": state.completed, "history": state.history,
                      "config_hash": state.meta.get("config_hash"), "world_size": self.world_size,
                      "zero_stage": int(engine.zero_optimization_stage()), "wall_seconds": state.wall_seconds}
            atomic_write(sharded_dir / PROGRESS_FILE, json.dumps(record, indent=1))
            atomic_write(sharded_dir / "latest", tag)  # what DeepSpeed's own tools read
            tags = sorted(p.name for p in sharded_dir.glob("epoch*") if p.is_dir())
            for old in tags[:-KEEP_TAGS]:
                shutil.rmtree(sharded_dir / old, ignore_errors=True)
        barrier()
        return tag

    def save(self, state: StageState) -> None:
        self._save(state)

    def finish(self, state: StageState) -> Path | None:
        final_tag = self._save(state)
        if self.export_path is not None and self.rank == 0:
            save_checkpoint(self.export_path, {
                **state.meta,
                "model": consolidated_state_dict(self.engine, self.sharded_dir, final_tag),
                "epoch": state.epoch,
                "completed": True,
                "history": state.history,
                "config": state.cfg.to_dict(),
                "resumed_from": self.resumed_from,
                "sharded_checkpoint": str(self.sharded_dir / final_tag),
            })
        barrier()
        return self.export_path
