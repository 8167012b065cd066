"""Unlearning: forget-set selection, the cached retrained reference, a method, ToW.

``run_unlearning(cfg, checkpoint)``:

1. rebuild the pretrained model and its data exactly (the checkpoint's own
   data config and seed, so label flips and splits match);
2. select the forget set (deterministic; saved as Parquet with its hash);
3. get the retrained reference: trained from scratch on the retain set with
   the *pretraining* recipe, cached by (data, split hash, model, training
   config, seed): a second method on the same split reuses it;
4. run the method's phases with the engine (the input checkpoint is never
   written);
5. measure retain/forget/val/test accuracy and ToW against the reference,
   write the long-format result table and log everything to MLflow.
"""
from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sharp_unlearn.config import ExperimentConfig, stable_hash
from sharp_unlearn.data.forget import ForgetSplit, memorization_groups
from sharp_unlearn.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from sharp_unlearn.engine.determinism import apply_determinism
from sharp_unlearn.engine.driver import LocalBackend, resolve_device
from sharp_unlearn.errors import ConfigError, TrainingDiverged
from sharp_unlearn.methods import METHODS
from sharp_unlearn.metrics.accuracy import split_accuracies
from sharp_unlearn.metrics.tow import forget_gap, tow
from sharp_unlearn.model_store import log_model
from sharp_unlearn.models import build_model
from sharp_unlearn.optim.factory import sam_spec
from sharp_unlearn.recipes.distributed import launch_deepspeed_unlearn, validate_launch
from sharp_unlearn.recipes.imported import checkpoint_origin
from sharp_unlearn.recipes.memorization import select_forget_set
from sharp_unlearn.recipes.pretrain import train_from_scratch
from sharp_unlearn.recipes.stages import Pretrained, epoch_evaluator, load_pretrained, unlearn_stage
from sharp_unlearn.results import rows_from_metrics, write_results
from sharp_unlearn.tracking import open_run
from sharp_unlearn.validation import check_config


@dataclass
class Reference:
    checkpoint: Path
    metrics: dict[str, float]
    run_id: str | None
    wall_seconds: float
    cached: bool


@dataclass
class UnlearnOutcome:
    checkpoint: Path | None
    metrics: dict[str, float]
    reference: Reference
    original_metrics: dict[str, float]
    split: ForgetSplit
    run_id: str | None
    method: str
    optimizer_tag: str
    results_path: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def unlearn_config(pretrained: Pretrained) -> dict:
    """The base config tree of an unlearning run: the checkpoint's own sections."""
    tree = copy.deepcopy(pretrained.state["config"])
    tree.pop("forget", None)
    tree.pop("method", None)
    # tracking is a choice of this run, not a property of the model (a checkpoint pretrained
    # with tracking off must not silently turn it off for its unlearning runs)
    tree.pop("tracking", None)
    return tree


def get_reference(pretrained: Pretrained, split: ForgetSplit, *, quiet: bool = False,
                  run_cfg: ExperimentConfig | None = None) -> Reference:
    """The retrained reference for this split: cached by (training hash, split hash).

    It uses the *pretraining* recipe; only where files go, the device and
    tracking come from ``run_cfg`` (they do not change the trained model).
    """
    ref_cfg = copy.deepcopy(pretrained.cfg)
    if run_cfg is not None:
        ref_cfg.tracking = copy.deepcopy(run_cfg.tracking)
        ref_cfg.output_dir = run_cfg.output_dir
        ref_cfg.device = run_cfg.device
    outcome = train_from_scratch(
        ref_cfg, pretrained.bundle, train_indices=split.retain_positions, split_hash=split.split_hash,
        kind="retrain", quiet=quiet,
        tags={"forget_set": split.label, "method": "retrain", "pretrain_run_id": pretrained.run_id})
    device = resolve_device(ref_cfg.device)
    state = load_checkpoint(outcome.checkpoint)
    model = build_model(ref_cfg.model, pretrained.bundle.num_classes, pretrained.bundle.input_shape)
    load_model_state(model, state["model"], "retrain reference")
    metrics = split_accuracies(model.to(device), pretrained.bundle, split.forget_positions,
                               split.retain_positions, device, ref_cfg.data.eval_batch_size)
    metrics["wall_seconds"] = outcome.wall_seconds
    return Reference(outcome.checkpoint, metrics, outcome.run_id, outcome.wall_seconds, outcome.cached)


def unlearn_run_name(pretrain_optimizer: str, method: str, optimizer_tag: str, forget_label: str,
                     seed: int = 0) -> str:
    """``pre-sam/neggrad-sgd/memorization-high-60``: unique within a grid (``/s<seed>`` for seeds but 0)."""
    name = f"pre-{pretrain_optimizer}/{method}-{optimizer_tag}/{forget_label}"
    return name if not seed else f"{name}/s{seed}"


def _log_previews(tracker, results_path: Path, split_path: Path, history: list[dict[str, float]],
                  title: str, original: dict[str, float]) -> None:
    """What the MLflow UI can show: result and forget-set tables as JSON/CSV, the forgetting curve figure."""
    import pyarrow.parquet as pq

    tracker.log_preview_table(pq.read_table(results_path).to_pylist(), "results/results.json")
    tracker.log_preview_table(pq.read_table(split_path).to_pylist(), "forget_set/forget_set.json")
    curve = [r for r in history if "forget_acc" in r]
    if not curve:
        return
    curve = [{"epoch": 0, **original}, *curve]  # epoch 0: the model before unlearning
    # a bare Figure, not pyplot: no global backend switch (a notebook's inline backend stays as it is)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 3.4), layout="constrained")
    acc_ax, tow_ax = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in curve]
    for key in ("retain_acc", "forget_acc", "test_acc"):
        acc_ax.plot(epochs, [r.get(key, float("nan")) for r in curve], marker="o", label=key)
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    acc_ax.legend(loc="best", fontsize="small")
    tow_ax.plot(epochs, [r.get("tow", float("nan")) for r in curve], marker="o", color="black")
    tow_ax.set(xlabel="epoch", ylabel="ToW", title="tug of war (1 = retrained)")
    for ax in (acc_ax, tow_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    tracker.log_figure(fig, "forgetting_curve.png")


def _output_dir(cfg: ExperimentConfig, split: ForgetSplit, pretrained: Pretrained) -> Path:
    key = stable_hash({"cfg": {k: v for k, v in cfg.hash_tree().items() if k not in ("tracking", "output_dir")},
                       "pretrain": pretrained.state.get("config_hash"), "split": split.split_hash})
    name = f"{split.label}-{cfg.method.name}-{cfg.optimizer.tag}-s{cfg.seed}-{key}"
    return Path(cfg.output_dir) / "unlearn" / name


def run_unlearning(cfg: ExperimentConfig, checkpoint: str | Path, *, quiet: bool = False,
                   pretrained: Pretrained | None = None, split: ForgetSplit | None = None,
                   scores: np.ndarray | None = None, save_model: bool = True,
                   reference: Reference | None = None,
                   epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
                   stage_checkpoint: Path | None = None) -> UnlearnOutcome:
    """Unlearn ``cfg.forget`` from ``checkpoint`` with ``cfg.method`` and ``cfg.optimizer``.

    Hooks for sweeps (Ray Tune trials), all optional: ``reference`` is a
    reference computed once by the caller (skips the cache lookup);
    ``epoch_callback(epoch, record)`` gets every evaluated epoch's record with
    retain/forget/val/test accuracy, ``tow`` and ``forget_gap`` against the
    reference, after that epoch's checkpoint is written; ``stage_checkpoint``
    is a file the stage checkpoints to every ``train.checkpoint_every`` epochs
    and resumes from (same config, split and pretrained model).
    """
    if cfg.method is None:
        raise ConfigError("unlearning needs a method: set method.name (e.g. method.name=sharp_minmax)")
    if cfg.forget is None:
        raise ConfigError("unlearning needs a forget set: set forget.kind and forget.size (or forget.classes)")
    # checked here too (idempotent): a config built without the registry checks (a sweep trial's) gets
    # every method setting's default, so it logs and hashes as the same config loaded through them
    cfg = check_config(cfg)
    method_cls = METHODS.get(cfg.method.name)
    if cfg.distributed.backend == "deepspeed":  # bad stage/workers/JSON fail before any training
        validate_launch(cfg)
    pretrained = pretrained or load_pretrained(checkpoint)
    bundle = pretrained.bundle
    device = resolve_device(cfg.device)
    apply_determinism(cfg)  # the forget set and the "do nothing" row are measured before the stage starts
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
    load_model_state(model, pretrained.state["model"],
                     f"checkpoint {str(pretrained.path)!r} (model.name={cfg.model.name!r})")
    model.to(device)
    if split is None:
        split = select_forget_set(cfg.forget, bundle, pretrained.cfg.seed, model=model, device=device,
                                  scores=scores, run_cfg=pretrained.cfg)
    groups = memorization_groups(split.scores, split.forget_positions) if split.scores is not None else None
    eval_bs = cfg.data.eval_batch_size
    original = split_accuracies(model, bundle, split.forget_positions, split.retain_positions, device, eval_bs,
                                groups)
    reference = reference or get_reference(pretrained, split, quiet=quiet, run_cfg=cfg)
    original["tow"] = tow(original, reference.metrics)  # the "do nothing" row
    method = method_cls(cfg.method, cfg.optimizer, sam_spec(cfg.optimizer))
    tags = {"method": cfg.method.name, "optimizer": method.optimizer_tag, "forget_set": split.label,
            "split_hash": split.split_hash, "pretrain_run_id": pretrained.run_id,
            "reference_run_id": reference.run_id, "pretrain_optimizer": pretrained.cfg.optimizer.tag,
            **checkpoint_origin(pretrained.state)}  # a checkpoint made outside this tool: where it came from
    out_dir = _output_dir(cfg, split, pretrained)
    # An interrupted stage leaves resumable state or nothing: the run folder appears with the
    # stage's first checkpoint (rerunning the same command resumes from it) and the outputs come
    # at the end; the stage's own checkpoint is dropped once the final model is saved.
    own_stage = stage_checkpoint is None
    if own_stage:
        stage_checkpoint = out_dir / "stage.pt"
    with open_run(cfg, kind="unlearn", tags=tags, run_name=unlearn_run_name(
            pretrained.cfg.optimizer.tag, cfg.method.name, method.optimizer_tag, split.label, cfg.seed)) as tracker:
        history: list[dict[str, float]] = []
        # per-epoch ToW: a sweep scheduler stops bad trials on it, and a tracked run's forgetting
        # curve (retain/forget/test accuracy and ToW by step) is what people look at in the MLflow UI
        per_epoch_tow = epoch_callback is not None or tracker.run_id is not None
        # step 0 of the forgetting curve: the model before unlearning (final values land at the last step)
        tracker.log_metrics({k: original[k] for k in ("retain_acc", "forget_acc", "val_acc", "test_acc", "tow")
                             if k in original}, step=0)
        if getattr(method_cls, "from_scratch", False):
            # "retrain" as a method: the reference itself is the unlearned model
            wall = reference.wall_seconds
            ref_state = load_checkpoint(reference.checkpoint)
            load_model_state(model, ref_state["model"], "retrain reference")
        elif cfg.distributed.backend == "deepspeed":
            # only the phases run ZeRO-sharded (recipes/distributed.py); the workers rebuild this
            # split from its positions and measure each epoch sharded (given the reference's
            # accuracies); the final measurement stays here, on the consolidated fp32 weights
            out_dir.mkdir(parents=True, exist_ok=True)
            sharded = launch_deepspeed_unlearn(cfg, pretrained.path, split, out_dir, config_hash=out_dir.name,
                                               quiet=quiet,
                                               reference_metrics=reference.metrics if per_epoch_tow else None)
            load_model_state(model, load_checkpoint(sharded.checkpoint)["model"], "sharded unlearning export")
            wall, history = sharded.wall_seconds, sharded.history
            for record in history:  # the workers log nothing: the run's per-epoch losses go in from here
                tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))
                if epoch_callback is not None:  # after the run (live reports go to Ray Tune from the workers)
                    epoch_callback(int(record["epoch"]), record)
        else:
            evaluate = None
            if per_epoch_tow:
                evaluate = epoch_evaluator(bundle, split, reference.metrics, device, eval_bs)
            stage_meta = {"config_hash": _output_dir(cfg, split, pretrained).name}
            try:
                result = unlearn_stage(cfg, model, bundle, split, method, LocalBackend(device, stage_checkpoint),
                                       checkpoint_meta=stage_meta, evaluate=evaluate, tracker=tracker, quiet=quiet,
                                       resume=True, on_epoch_end=epoch_callback)
            except TrainingDiverged:
                shutil.rmtree(out_dir, ignore_errors=True)  # no half result; the input checkpoint is untouched
                raise
            wall = result.wall_seconds
            history = result.history
        metrics = split_accuracies(model, bundle, split.forget_positions, split.retain_positions, device,
                                   eval_bs, groups)
        metrics["tow"] = tow(metrics, reference.metrics)
        metrics["forget_gap"] = forget_gap(metrics, reference.metrics)
        metrics["wall_seconds"] = wall
        metrics["speedup_vs_retrain"] = reference.wall_seconds / wall if wall > 0 else float("nan")
        tracker.log_metrics(metrics)
        # the baselines next to the run's own numbers, so a comparison needs no artifact download
        tracker.log_metrics({**{f"original_{k}": v for k, v in original.items()},
                             **{f"reference_{k}": v for k, v in reference.metrics.items()}})
        out_dir.mkdir(parents=True, exist_ok=True)
        split_path = split.to_parquet(out_dir / "forget_set.parquet")
        ckpt_path = None
        if save_model:
            ckpt_path = save_checkpoint(out_dir / "checkpoint.pt", {
                "model": model.state_dict(), "config": cfg.to_dict(), "completed": True,
                "config_hash": cfg.training_hash(), "split_hash": split.split_hash,
                "num_classes": bundle.num_classes, "input_shape": list(bundle.input_shape),
                "model_name": cfg.model.name, "dataset": cfg.data.name, "kind": "unlearn",
                "method": cfg.method.name, "optimizer_tag": method.optimizer_tag,
                "forget_indices": torch.as_tensor(split.forget_indices),
                "forget_positions": torch.as_tensor(split.forget_positions),
                "forget_label": split.label,
                "reference_checkpoint": str(reference.checkpoint),
                "pretrain_checkpoint": str(pretrained.path),
                "pretrain_config": pretrained.state["config"],
                "final_metrics": metrics, "run_id": tracker.run_id,
            })
        common = dict(dataset=cfg.data.name, forget_set=split.label, seed=cfg.seed)
        rows = rows_from_metrics(metrics, run_id=tracker.run_id, method=cfg.method.name,
                                 optimizer=method.optimizer_tag, **common)
        rows += rows_from_metrics(reference.metrics, run_id=reference.run_id, method="retrain",
                                  optimizer=pretrained.cfg.optimizer.tag, **common)
        rows += rows_from_metrics(original, run_id=pretrained.run_id,
                                  method="original", optimizer=pretrained.cfg.optimizer.tag, **common)
        results_path = write_results(rows, out_dir / "results.parquet")
        (out_dir / "config.yaml").write_text(cfg.to_yaml())
        tracker.log_artifact(split_path, "forget_set")
        tracker.log_artifact(results_path, "results")
        tracker.log_artifact(out_dir / "config.yaml")
        if ckpt_path is not None:
            tracker.log_artifact(ckpt_path, "checkpoint")
        if tracker.run_id is not None:
            _log_previews(tracker, results_path, split_path, history,
                          f"{cfg.method.name}/{method.optimizer_tag} on {split.label}", original)
            if ckpt_path is not None:
                log_model(tracker, model, ckpt_path, cfg, bundle.test)
    if own_stage:
        stage_checkpoint.unlink(missing_ok=True)  # the final checkpoint and results supersede it
    return UnlearnOutcome(ckpt_path, metrics, reference, original, split, tracker.run_id, cfg.method.name,
                          method.optimizer_tag, results_path, history)
