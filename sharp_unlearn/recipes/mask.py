"""Saliency masks for a forget set, saved for reuse by ``salun`` and ``sharp_minmax``.

``make_masks(cfg, pretrained, fractions)`` selects the forget set exactly as
the unlearn recipe does (same function, same seed: the checkpoint's), computes
``|grad L_F|`` once at the pretrained weights on the un-augmented training
examples, and writes one mask file per fraction (atomic, with metadata that
``saliency_mask_for`` checks: fraction, order and split hash). Files are logged as
MLflow artifacts of a ``kind=mask`` run.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sharp_unlearn.config import ExperimentConfig
from sharp_unlearn.engine.checkpoint import load_model_state
from sharp_unlearn.engine.runner import resolve_device
from sharp_unlearn.engine.saliency import forget_gradient_saliency
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.metrics.accuracy import subset
from sharp_unlearn.models import build_model
from sharp_unlearn.optim.saliency import mask_file_name, masks_for_fractions, save_mask
from sharp_unlearn.recipes.memorization import select_forget_set
from sharp_unlearn.tracking import open_run


@dataclass
class MaskOutcome:
    paths: dict[float, Path]
    selected: dict[float, int]
    total_entries: int
    split_hash: str
    forget_set: str
    forget_size: int
    out_dir: Path
    run_id: str | None
    wall_seconds: float


def parse_fractions(text: str | None, default: float) -> list[float]:
    """``"0.1,0.3,0.5"`` -> ``[0.1, 0.3, 0.5]`` (order kept, duplicates dropped), each in (0, 1)."""
    if text is None or not text.strip():
        return [default]
    out: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"--fractions: {part!r} is not a number; expected e.g. 0.1,0.3,0.5") from None
        if not 0.0 < value < 1.0:
            raise ConfigError(f"--fractions: {value:g} is out of range; expected values in (0, 1)")
        if value not in out:
            out.append(value)
    if not out:
        raise ConfigError(f"--fractions={text!r} names no fraction; expected e.g. 0.1,0.3,0.5")
    return out


def default_mask_dir(cfg: ExperimentConfig, pretrained, split_hash: str) -> Path:
    ckpt = pretrained.state.get("config_hash") or "ckpt"
    return Path(cfg.output_dir) / "masks" / f"{cfg.data.name}-{cfg.model.name}-{ckpt}-{split_hash}"


def make_masks(cfg: ExperimentConfig, pretrained, fractions: Sequence[float], *, out_dir: str | Path | None = None,
               quiet: bool = False) -> MaskOutcome:
    """Compute and save one saliency mask per fraction for ``cfg.forget`` on ``pretrained``."""
    if cfg.forget is None:
        raise ConfigError("a mask needs a forget set: set forget.kind and forget.size (or forget.classes)")
    fractions = [float(f) for f in fractions]
    started = time.perf_counter()
    bundle = pretrained.bundle
    device = resolve_device(cfg.device)
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
    load_model_state(model, pretrained.state["model"],
                     f"checkpoint {str(pretrained.path)!r} (model.name={cfg.model.name!r})")
    model.to(device)
    # the same call (and seed) as the unlearn recipe, so the split hash matches there
    split = select_forget_set(cfg.forget, bundle, pretrained.cfg.seed, model=model, device=device,
                              run_cfg=pretrained.cfg)
    forget = subset(bundle.train_eval, split.forget_positions)
    scores = forget_gradient_saliency(model, forget, device, cfg.data.eval_batch_size)
    order = cfg.method.mask_order if cfg.method is not None else "largest"
    masks = masks_for_fractions(scores, fractions, order)
    total = sum(s.numel() for s in scores.values())
    directory = Path(out_dir) if out_dir is not None else default_mask_dir(cfg, pretrained, split.split_hash)
    tags = {"forget_set": split.label, "split_hash": split.split_hash, "pretrain_run_id": pretrained.run_id,
            "optimizer": pretrained.cfg.optimizer.tag}
    with open_run(cfg, kind="mask", tags=tags, run_name=f"mask-{split.label}") as tracker:
        directory.mkdir(parents=True, exist_ok=True)
        paths: dict[float, Path] = {}
        selected: dict[float, int] = {}
        for fraction, mask in masks.items():
            count = int(sum(float(m.sum()) for m in mask.values()))
            meta = {"fraction": fraction, "order": order, "split_hash": split.split_hash, "forget_set": split.label,
                    "forget_size": len(split.forget_positions), "selected": count, "total_entries": total,
                    "scores": "abs_grad_mean_forget_ce", "checkpoint": str(pretrained.path),
                    "checkpoint_config_hash": pretrained.state.get("config_hash"),
                    "pretrain_run_id": pretrained.run_id, "dataset": cfg.data.name, "model": cfg.model.name,
                    "seed": pretrained.cfg.seed}
            paths[fraction] = save_mask(directory / mask_file_name(split.label, fraction, order), mask, meta)
            selected[fraction] = count
        split_path = split.to_parquet(directory / "forget_set.parquet")
        wall = time.perf_counter() - started
        tracker.log_params({"mask.fractions": ",".join(f"{f:g}" for f in fractions)})
        tracker.log_metrics({"wall_seconds": wall})
        for path in paths.values():
            tracker.log_artifact(path, "masks")
        tracker.log_artifact(split_path, "forget_set")
    return MaskOutcome(paths, selected, total, split.split_hash, split.label, len(split.forget_positions),
                       directory, tracker.run_id, wall)
