"""Evaluate a checkpoint, the recipe behind ``sharp-unlearn evaluate``.

It rebuilds the model and its data exactly (an unlearning checkpoint's forget set
and retrained reference come from the checkpoint; a pretrain checkpoint takes
``forget.*`` overrides), runs the metrics (:func:`sharp_unlearn.evaluation.run_metrics`)
inside an MLflow run (``kind=evaluate``), and writes ``results.parquet`` (long
format, one row per run/split/metric), ``details.json`` and the figures. It is a
recipe, not part of ``evaluation``, because choosing a forget set by proxy
memorization scores can need a model pass or a training run.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from sharp_unlearn.config import config_from_dict
from sharp_unlearn.data import build_dataset
from sharp_unlearn.data.forget import train_stable_indices
from sharp_unlearn.engine.checkpoint import load_checkpoint
from sharp_unlearn.engine.determinism import apply_determinism
from sharp_unlearn.engine.runner import resolve_device
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.evaluation import EvaluationResult, parse_metrics, resolve_auto, run_metrics
from sharp_unlearn.files import atomic_write
from sharp_unlearn.metrics import METRICS, EvalContext, EvalOptions
from sharp_unlearn.metrics.base import check_requirements
from sharp_unlearn.model_store import is_model_uri, resolve_checkpoint
from sharp_unlearn.recipes.memorization import select_forget_set
from sharp_unlearn.results import write_results
from sharp_unlearn.stage_checkpoints import load_trained_model, stage_dir
from sharp_unlearn.tracking import open_run
from sharp_unlearn.validation import load_config


@dataclass
class EvaluationTarget:
    """A checkpoint's model rebuilt with its data, splits and (optional) retrained reference."""

    checkpoint: Path
    model: torch.nn.Module
    cfg: Any
    state: dict[str, Any]
    bundle: Any
    splits: dict[str, Any]
    reference: torch.nn.Module | None
    reference_checkpoint: Path | None
    forget_label: str
    split_hash: str | None
    method: str
    optimizer: str
    device: torch.device

    @property
    def run_id(self) -> str | None:
        return self.state.get("run_id")


def _kind_method(state: dict[str, Any]) -> str:
    if state.get("method"):
        return str(state["method"])
    # the untouched pretrained model is the "do nothing" row of every table; a retrain checkpoint is the reference
    return {"pretrain": "original", "retrain": "retrain"}.get(state.get("kind", "pretrain"), str(state.get("kind")))


def _check_shape(state: dict[str, Any], bundle, what: str) -> None:
    classes = state.get("num_classes")
    shape = state.get("input_shape")
    if classes is not None and int(classes) != bundle.num_classes:
        raise ConfigError(f"{what} was trained for {classes} classes but data set {bundle.name!r} has "
                          f"{bundle.num_classes}")
    if shape is not None and tuple(shape) != tuple(bundle.input_shape):
        raise ConfigError(f"{what} expects inputs of shape {tuple(shape)} but data set {bundle.name!r} gives "
                          f"{tuple(bundle.input_shape)}")


def prepare_target(checkpoint: str | Path, *, config_files: Sequence[str] = (), overrides: Sequence[str] = (),
                   reference: str | Path | None = None) -> EvaluationTarget:
    """Rebuild what a checkpoint needs for evaluation; every mismatch is a ConfigError."""

    if is_model_uri(checkpoint):  # runs:/<id>/model or models:/<name>/<version>, from the store the overrides name
        uris = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "tracking.uri"]
        checkpoint = resolve_checkpoint(checkpoint, uris[-1] if uris else None)
    path = Path(checkpoint)
    state = load_checkpoint(path)
    if "config" not in state:
        raise ConfigError(f"checkpoint {str(path)!r} carries no config; expected a sharp-unlearn checkpoint")
    carries_forget = "forget_positions" in state or "forget_indices" in state
    forget_overrides = [o for o in overrides if o.split("=", 1)[0].strip().startswith("forget")]
    if carries_forget and forget_overrides:
        raise ConfigError(f"checkpoint {str(path)!r} is an unlearning checkpoint with its own forget set "
                          f"({state.get('forget_label', '?')}); drop the override {forget_overrides[0]!r}")
    cfg = load_config(list(config_files), list(overrides), base=state["config"])
    device = resolve_device(cfg.device)
    apply_determinism(cfg)
    # the data exactly as the model saw it: label flips are seeded by the *pretraining* seed
    data_source = config_from_dict(state["pretrain_config"]) if "pretrain_config" in state else cfg
    bundle = build_dataset(data_source.data, data_source.seed)
    _check_shape(state, bundle, f"checkpoint {str(path)!r}")
    model, _, _ = load_trained_model(path, cfg, device)  # architecture mismatch -> ConfigError

    splits: dict[str, Any] = {"test": bundle.test, "val": bundle.val}
    split_hash = state.get("split_hash") if state.get("split_hash") not in (None, "full") else None
    if carries_forget:
        n = len(bundle.train_targets)
        if "forget_positions" in state:
            forget_pos = np.asarray(torch.as_tensor(state["forget_positions"]), dtype=np.int64)
        else:
            stable = train_stable_indices(bundle)
            lookup = {int(s): i for i, s in enumerate(stable)}
            wanted = np.asarray(torch.as_tensor(state["forget_indices"]), dtype=np.int64)
            missing = [int(i) for i in wanted if int(i) not in lookup]
            if missing:
                raise ConfigError(f"checkpoint {str(path)!r} names forget example {missing[0]} that the data set "
                                  "does not have; is this the data set it was trained on?")
            forget_pos = np.asarray([lookup[int(i)] for i in wanted], dtype=np.int64)
        if len(forget_pos) == 0 or forget_pos.max() >= n:
            raise ConfigError(f"checkpoint {str(path)!r} has forget positions outside the training set ({n})")
        keep = np.ones(n, dtype=bool)
        keep[forget_pos] = False
        retain_pos = np.flatnonzero(keep)
        forget_label = str(state.get("forget_label") or (cfg.forget.label if cfg.forget else "custom"))
    elif cfg.forget is not None:
        split = select_forget_set(cfg.forget, bundle, cfg.seed, model=model, device=device, run_cfg=cfg)
        if split_hash is not None and split.split_hash != split_hash:
            raise ConfigError(f"checkpoint {str(path)!r} was trained for split {split_hash} but forget set "
                              f"{split.label!r} selects split {split.split_hash}; pass the forget.* settings "
                              "it was trained with")
        forget_pos, retain_pos = split.forget_positions, split.retain_positions
        forget_label, split_hash = split.label, split.split_hash
    else:
        forget_pos = retain_pos = None
        forget_label = "none"
    if forget_pos is not None:
        splits["retain"] = Subset(bundle.train_eval, np.asarray(retain_pos).tolist())
        splits["forget"] = Subset(bundle.train_eval, np.asarray(forget_pos).tolist())
    else:
        splits["train"] = bundle.train_eval

    ref_path = Path(reference) if reference is not None else (
        Path(state["reference_checkpoint"]) if state.get("reference_checkpoint") else None)
    if ref_path is None and split_hash is not None and state.get("kind", "pretrain") == "pretrain":
        ref_path = cached_reference(data_source, split_hash)
    ref_model = None
    if ref_path is not None:
        if not ref_path.is_file():
            raise ConfigError(f"reference checkpoint {str(ref_path)!r} does not exist"
                              + ("" if reference is not None else f" (named by {str(path)!r}; pass --reference)"))
        ref_state_model, _, ref_state = load_trained_model(ref_path, device=device)
        _check_shape(ref_state, bundle, f"reference checkpoint {str(ref_path)!r}")
        ref_split = ref_state.get("split_hash")
        if split_hash is not None and ref_split not in (None, "full", split_hash):
            raise ConfigError(f"reference checkpoint {str(ref_path)!r} was retrained for split {ref_split}, "
                              f"not this forget set's split {split_hash}")
        ref_model = ref_state_model.eval()
    optimizer = str(state.get("optimizer_tag") or cfg.optimizer.tag)
    return EvaluationTarget(path, model.eval(), cfg, state, bundle, splits, ref_model, ref_path, forget_label,
                            split_hash, _kind_method(state), optimizer, device)


def cached_reference(pretrain_cfg, split_hash: str) -> Path | None:
    """The retrained reference ``unlearn`` cached for this pretraining recipe and split, if there is one."""

    path = stage_dir(pretrain_cfg, "retrain", split_hash) / "checkpoint.pt"
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    complete = state.get("completed") and state.get("split_hash") == split_hash
    return path if complete and state.get("config_hash") == pretrain_cfg.training_hash() else None


@dataclass
class EvaluationOutcome:
    result: EvaluationResult
    target: EvaluationTarget
    out_dir: Path
    results_path: Path
    run_id: str | None
    rows: list[dict[str, Any]]


def evaluate_checkpoint(checkpoint: str | Path, metrics: str | Sequence[str] = "auto", *,
                        out_dir: str | Path | None = None, options: EvalOptions | None = None,
                        config_files: Sequence[str] = (), overrides: Sequence[str] = (),
                        reference: str | Path | None = None,
                        progress: Callable[[str], None] | None = None) -> EvaluationOutcome:
    """The ``sharp-unlearn evaluate`` recipe (see the module doc)."""

    names = parse_metrics(metrics)  # bad names fail before anything is loaded
    options = options or EvalOptions()
    target = prepare_target(checkpoint, config_files=config_files, overrides=overrides, reference=reference)
    cfg = target.cfg
    if out_dir is not None:
        out = Path(out_dir)
    elif is_model_uri(checkpoint):  # the download folder is a cache: results go where the user's runs go
        out = Path(cfg.output_dir) / "evaluate" / re.sub(r"[^A-Za-z0-9_.@-]+", "_", str(checkpoint)).strip("_")
    else:
        out = target.checkpoint.parent / "eval"
    ctx = EvalContext(target.model, target.splits, reference=target.reference, device=target.device,
                      options=options, out_dir=out, seed=cfg.seed, num_classes=target.bundle.num_classes)
    names = resolve_auto(names, ctx)
    for name in names:  # fail on a missing forget set / reference before opening an MLflow run
        check_requirements(METRICS.get(name), ctx)
    tags = {"method": target.method, "optimizer": target.optimizer, "forget_set": target.forget_label,
            "split_hash": target.split_hash, "evaluated_run_id": target.run_id,
            "evaluated_checkpoint": str(target.checkpoint.resolve()),
            "reference_checkpoint": str(target.reference_checkpoint) if target.reference_checkpoint else None,
            "metrics": ",".join(names)}
    start = time.perf_counter()
    with open_run(cfg, kind="evaluate", tags=tags, run_name=f"evaluate-{target.method}-{target.optimizer}",
                  parent_run_id=target.run_id) as tracker:
        result = run_metrics(ctx, names, progress)
        wall = time.perf_counter() - start
        row_id = target.run_id or tracker.run_id
        rows = result.rows(run_id=row_id, method=target.method, optimizer=target.optimizer,
                           dataset=cfg.data.name, forget_set=target.forget_label, seed=cfg.seed)
        results_path = write_results(rows, out / "results.parquet")
        details = {"checkpoint": str(target.checkpoint), "metrics": names, "options": vars(options),
                   "seconds": result.seconds, "wall_seconds": wall, "headline": result.headline,
                   "tags": result.tags, "prediction_passes": ctx.prediction_passes, **result.details}
        details_path = out / "details.json"
        atomic_write(details_path, json.dumps(details, indent=2, default=_jsonable))
        tracker.log_metrics({**result.mlflow_metrics(), "wall_seconds": wall})
        tracker.set_tags(result.tags)
        tracker.log_artifact(results_path, "results")
        tracker.log_artifact(details_path, "results")
        for artifact in result.artifacts:
            tracker.log_artifact(artifact, "figures" if artifact.suffix == ".png" else "results")
    return EvaluationOutcome(result, target, out, results_path, tracker.run_id, rows)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
