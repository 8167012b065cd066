"""DeepSpeed JSON for a run: load, fill from the run config, reject contradictions.

Everything here is pure Python (no deepspeed, no process group), so a bad
``distributed.*`` setting or a DeepSpeed file that disagrees with the run
config fails as a :class:`ConfigError` before any worker starts.

Rules:

* The packaged files ``configs/deepspeed/zero{0,1,2,3}.json`` are defaults: the
  run config fills their ``"auto"`` batch sizes and overrides
  ``gradient_clipping`` (so it is always explicit; DeepSpeed's own default
  would clip at 1.0).
* A user file (``distributed.deepspeed_config``) is checked instead: a value
  that disagrees with the run config (batch sizes, accumulation, clipping,
  ZeRO stage) is an error naming both sides; ``"auto"`` or a missing key is
  filled.
* ``data.batch_size`` is the per-worker micro-batch, so
  ``train_batch_size = data.batch_size * num_workers * train.grad_accum``.
* The optimizer and lr schedule come from ``optimizer.*``/``train.*`` and are
  passed to DeepSpeed as torch objects (nothing compiles a CPU Adam), so an
  ``optimizer``/``scheduler`` section is rejected, as is fp16 (its dynamic loss
  scale skips steps, which would leave SAM's perturbation in the weights) and
  parameter/optimizer offload (the SAM step reads partitions in place).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from sharp_unlearn.config import ExperimentConfig, packaged_config
from sharp_unlearn.errors import ConfigError

ZERO_STAGES = (0, 1, 2, 3)


def packaged_deepspeed_config(stage: int) -> Path:
    if stage not in ZERO_STAGES:
        raise ConfigError(f"distributed.zero_stage={stage!r} is not valid; expected one of: 0, 1, 2, 3")
    return packaged_config("deepspeed") / f"zero{stage}.json"


def load_deepspeed_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {str(path)!r} must hold a JSON object")
    return data


def _is_auto(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.lower() == "auto")


def resolve_deepspeed_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The DeepSpeed config dict this run hands to ``deepspeed.initialize``."""
    dist = cfg.distributed
    user_path = dist.deepspeed_config
    source = f"DeepSpeed config {user_path!r}" if user_path else f"packaged zero{dist.zero_stage}.json"
    raw = load_deepspeed_json(user_path or packaged_deepspeed_config(dist.zero_stage))
    ds = copy.deepcopy(raw)

    workers, micro, accum = dist.num_workers, cfg.data.batch_size, cfg.train.grad_accum
    expected = {
        "train_micro_batch_size_per_gpu": (micro, f"data.batch_size={micro}"),
        "gradient_accumulation_steps": (accum, f"train.grad_accum={accum}"),
        "train_batch_size": (micro * workers * accum,
                             f"data.batch_size={micro} x distributed.num_workers={workers} "
                             f"x train.grad_accum={accum} = {micro * workers * accum}"),
    }
    for key, (value, why) in expected.items():
        given = ds.get(key)
        if _is_auto(given):
            ds[key] = value
            continue
        if isinstance(given, bool) or not isinstance(given, int):
            raise ConfigError(f"{source}: {key}={given!r} is not an integer or \"auto\"")
        if given != value:
            raise ConfigError(f"{source}: {key}={given} contradicts the run config ({why}); "
                              f"set it to {value} or \"auto\"")

    clip = ds.get("gradient_clipping")
    if _is_auto(clip) or not user_path:
        ds["gradient_clipping"] = float(cfg.train.grad_clip)
    elif not isinstance(clip, (int, float)) or isinstance(clip, bool):
        raise ConfigError(f"{source}: gradient_clipping={clip!r} is not a number or \"auto\"")
    elif float(clip) != float(cfg.train.grad_clip):
        raise ConfigError(f"{source}: gradient_clipping={clip} contradicts train.grad_clip={cfg.train.grad_clip} "
                          "(0 disables clipping); make them equal or use \"auto\"")

    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{source}: zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", dist.zero_stage)
    if stage not in ZERO_STAGES:
        raise ConfigError(f"{source}: zero_optimization.stage={stage!r} is not valid; expected one of: 0, 1, 2, 3")
    if stage != dist.zero_stage:
        raise ConfigError(f"{source}: zero_optimization.stage={stage} contradicts "
                          f"distributed.zero_stage={dist.zero_stage}")
    zero["stage"] = stage
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none") if isinstance(zero.get(key), dict) else "none"
        if device not in (None, "none"):
            raise ConfigError(f"{source}: zero_optimization.{key}.device={device!r} is not supported: "
                              "the SAM step reads and writes the rank's partitions in place; use \"none\"")

    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{source}: remove the {key!r} section; the {key} comes from the run config "
                              f"({'optimizer.*' if key == 'optimizer' else 'train.schedule'}) and is passed "
                              "to DeepSpeed as a torch object")
    if (ds.get("fp16") or {}).get("enabled", False):
        raise ConfigError(f"{source}: fp16.enabled=true is not supported (its dynamic loss scale skips steps, "
                          "which would leave SAM's perturbation in the weights); use bf16 on GPU or fp32")
    bf16 = bool((ds.get("bf16") or {}).get("enabled", False))
    if bf16 and stage == 0:
        raise ConfigError(f"{source}: bf16 needs zero_optimization.stage >= 1 here (stage 0 has no fp32 master "
                          "partition to restore SAM's weights from); use stage 1-3 or fp32")
    if ds.get("zero_allow_untested_optimizer") is False and stage > 0:
        raise ConfigError(f"{source}: zero_allow_untested_optimizer=false, but the run passes a torch "
                          f"{cfg.optimizer.base_name!r} optimizer to ZeRO; set it to true")
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**9)  # our own progress and MLflow metrics report training
    return ds


def local_resources() -> dict[str, int]:
    """CPUs this process may use and visible CUDA devices (no CUDA init beyond a count)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - broken CUDA install counts as none
        gpus = 0
    return {"CPU": cpus, "GPU": gpus}


def check_worker_resources(cfg: ExperimentConfig, available: dict[str, float], where: str = "this machine") -> None:
    """More workers than CPUs (or GPUs with use_gpu) would oversubscribe or wait forever: reject."""
    dist = cfg.distributed
    kind = "GPU" if dist.use_gpu else "CPU"
    have = int(available.get(kind, 0) or 0)
    if dist.num_workers > have:
        raise ConfigError(f"distributed.num_workers={dist.num_workers} needs {dist.num_workers} {kind}s "
                          f"(one per worker, distributed.use_gpu={str(dist.use_gpu).lower()}), but {where} "
                          f"has {have}; lower num_workers" + ("" if dist.use_gpu else " or add nodes"))


def validate_distributed(cfg: ExperimentConfig, available: dict[str, float] | None = None,
                         where: str = "this machine") -> dict[str, Any]:
    """All checks that must pass before any process group starts; returns the DeepSpeed dict."""
    if cfg.distributed.backend != "deepspeed":
        raise ConfigError(f"distributed.backend={cfg.distributed.backend!r}: this launch path needs 'deepspeed'")
    ds = resolve_deepspeed_config(cfg)
    check_worker_resources(cfg, local_resources() if available is None else available, where)
    if cfg.distributed.use_gpu and cfg.device == "cpu":
        raise ConfigError("distributed.use_gpu=true contradicts device=cpu; set device=auto or cuda")
    return ds
