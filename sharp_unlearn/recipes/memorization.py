"""Memorization estimation entry points, and the scores a memorization forget set is chosen by.

``compute_memorization`` (held-out scores over K trainings, optionally with
proxies and influence) and ``proxy_table`` (one training's proxies) are what
``sharp-unlearn memorization`` runs; the trainings themselves live in
:mod:`sharp_unlearn.recipes.memorization_heldout` and
:mod:`sharp_unlearn.recipes.memorization_proxies`, the arithmetic and score
tables in :mod:`sharp_unlearn.data.memorization`.

:func:`select_forget_set` is forget-set selection for a run: it computes the
scores ``forget.scores`` names when they come from a model (``proxy:loss``,
``proxy:confidence``) or a training run (``proxy:learning_speed``) and hands
them to :func:`sharp_unlearn.data.forget.select_forget_set`, which only ranks
scores it is given or reads from a file.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sharp_unlearn.config import ForgetConfig
from sharp_unlearn.data import DatasetBundle, build_dataset
from sharp_unlearn.data import forget as forget_selection
from sharp_unlearn.data.forget import ForgetSplit, train_stable_indices
from sharp_unlearn.data.memorization import (
    HeldoutEstimate,
    auroc,
    heldout_estimate,
    influence_top_k,
    proxy_agreement,
    write_scores,
    write_table,
)
from sharp_unlearn.engine.loop import predict
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.recipes.memorization_heldout import default_run_dir, run_heldout
from sharp_unlearn.recipes.memorization_proxies import check_kinds, compute_proxy_scores, proxy_cache_path
from sharp_unlearn.tracking import open_run


@dataclass
class MemorizationResult:
    scores_path: Path
    estimate: HeldoutEstimate
    summary: dict[str, Any]
    influence_path: Path | None = None
    proxies: dict[str, np.ndarray] | None = None


def compute_memorization(cfg, settings, *, proxies: tuple[str, ...] = (), run_dir: str | os.PathLike | None = None,
                         quiet: bool = False, on_model_done=None) -> MemorizationResult:
    """Held-out memorization scores for ``cfg``'s data set and training recipe.

    Trains the missing subset models (Ray tasks, resumable), writes
    ``<run dir>/scores.parquet`` (``index``, ``score``, ``stderr``, ``n_in``,
    ``n_out``, ``p_in``, ``p_out`` and ``proxy_<kind>`` columns when
    ``proxies`` are asked for), ``influence.parquet`` with ``settings.influence``,
    and logs one MLflow run (kind ``memorization``).
    """
    if proxies:
        check_kinds(proxies)
    started = time.perf_counter()
    bundle = build_dataset(cfg.data, cfg.seed)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, settings.subset_fraction)
    tags = {"optimizer": cfg.optimizer.tag, "memorization_models": settings.num_models}
    with open_run(cfg, kind="memorization", tags=tags, run_name=f"memorization-K{settings.num_models}") as tracker:
        tracker.log_params(settings.params())
        run = run_heldout(cfg, settings, bundle=bundle, run_dir=run_dir, quiet=quiet, on_model_done=on_model_done)
        estimate = heldout_estimate(run.masks, run.train_correct)
        summary: dict[str, Any] = {
            "num_models": settings.num_models, "models_trained": len(run.trained),
            "models_reused": len(run.reused), "mean_score": float(estimate.score.mean()),
            "mean_stderr": float(estimate.stderr.mean()),
            "model_seconds_mean": float(np.mean(run.model_seconds)),
        }
        if run.trained:
            summary["models_per_minute"] = 60.0 * len(run.trained) / max(run.wall_seconds, 1e-9)
        flipped = bundle.meta.get("flipped")
        if flipped is not None and len(flipped):
            summary["flipped_auroc"] = auroc(estimate.score, flipped)
        extra: dict[str, np.ndarray] = {"label": np.asarray(bundle.train_targets, dtype=np.int64)}
        proxy_scores = None
        if proxies:
            proxy_scores = compute_proxy_scores(cfg, bundle, proxies, quiet=quiet)
            for kind, rho in proxy_agreement(estimate.score, proxy_scores).items():
                summary[f"spearman_{kind}"] = rho
                if flipped is not None and len(flipped):
                    summary[f"flipped_auroc_{kind}"] = auroc(proxy_scores[kind], flipped)
            extra.update({f"proxy_{kind}": values for kind, values in proxy_scores.items()})
        metadata = {"estimator": "heldout", "dataset": cfg.data.name, "model": cfg.model.name,
                    "optimizer": cfg.optimizer.tag, "seed": cfg.seed, "training_hash": cfg.training_hash(),
                    "num_models": settings.num_models, "subset_fraction": settings.subset_fraction}
        scores_path = write_scores(estimate, run_dir / "scores.parquet", index=train_stable_indices(bundle),
                                   extra=extra, metadata=metadata)
        influence_path = None
        if settings.influence:
            pairs = influence_top_k(run.masks, run.test_correct, settings.influence_top_k)
            influence_path = write_table(pairs, run_dir / "influence.parquet", metadata)
        summary["wall_seconds"] = time.perf_counter() - started
        tracker.log_metrics(summary)
        tracker.log_artifact(scores_path)
        if influence_path is not None:
            tracker.log_artifact(influence_path)
    summary["run_id"] = tracker.run_id
    return MemorizationResult(scores_path, estimate, summary, influence_path, proxy_scores)


def proxy_table(cfg, kinds: tuple[str, ...], *, run_dir: str | os.PathLike | None = None,
                quiet: bool = False) -> tuple[Path, dict[str, Any]]:
    """Proxy-only scores (one training, for data too large for K trainings):
    ``proxies.parquet`` with ``index``, ``score`` (the first kind) and ``proxy_<kind>``."""
    kinds = check_kinds(kinds)
    bundle = build_dataset(cfg.data, cfg.seed)
    run_dir = Path(run_dir) if run_dir is not None else proxy_cache_path(cfg).with_suffix("")
    with open_run(cfg, kind="memorization", tags={"optimizer": cfg.optimizer.tag, "memorization_proxies":
                                                 ",".join(kinds)}, run_name="memorization-proxies") as tracker:
        scores = compute_proxy_scores(cfg, bundle, kinds, quiet=quiet)
        summary: dict[str, Any] = {}
        flipped = bundle.meta.get("flipped")
        if flipped is not None and len(flipped):
            summary.update({f"flipped_auroc_{k}": auroc(v, flipped) for k, v in scores.items()})
        columns = {"index": train_stable_indices(bundle), "score": scores[kinds[0]],
                   "label": np.asarray(bundle.train_targets, dtype=np.int64),
                   **{f"proxy_{k}": v for k, v in scores.items()}}
        path = write_table(columns, run_dir / "proxies.parquet",
                           {"estimator": f"proxy:{kinds[0]}", "dataset": cfg.data.name, "model": cfg.model.name,
                            "seed": cfg.seed, "training_hash": cfg.training_hash()})
        tracker.log_metrics(summary)
        tracker.log_artifact(path)
    summary["run_id"] = tracker.run_id
    return path, summary


# ---------------------------------------------------------------- forget-set scores
@torch.no_grad()
def model_proxy_scores(model: torch.nn.Module, bundle: DatasetBundle, kind: str, device="cpu",
                       batch_size: int = 512) -> np.ndarray:
    """Cheap memorization proxies from a trained model: per-example loss, or 1 - label confidence.

    High loss / low confidence on a *training* example marks what the model
    had to memorize (or has not fit); learning-speed proxies need the
    training run itself (see :mod:`sharp_unlearn.recipes.memorization_proxies`).
    """
    out = predict(model, bundle.train_eval, batch_size, device)
    logp = torch.log_softmax(out["logits"], 1)
    label_logp = logp.gather(1, out["labels"][:, None]).squeeze(1)
    if kind == "proxy:loss":
        return (-label_logp).double().numpy()
    return (1.0 - label_logp.exp()).double().numpy()


def computed_scores(spec: str, bundle: DatasetBundle, model: torch.nn.Module | None, device="cpu",
                    run_cfg=None) -> np.ndarray | None:
    """The scores ``forget.scores=spec`` names when they must be computed (None for a score file or
    ``flipped``, which the data layer reads itself)."""
    if spec in ("proxy:loss", "proxy:confidence"):
        if model is None:
            raise ConfigError(f"forget.scores={spec!r} needs a trained model (pass --checkpoint)")
        return model_proxy_scores(model, bundle, spec, device)
    if spec == "proxy:learning_speed":
        if run_cfg is None:
            raise ConfigError("forget.scores='proxy:learning_speed' needs the run's config")
        return np.asarray(compute_proxy_scores(run_cfg, bundle, kinds=("learning_speed",))["learning_speed"])
    return None


def select_forget_set(cfg: ForgetConfig, bundle: DatasetBundle, seed: int, model: torch.nn.Module | None = None,
                      device="cpu", scores: np.ndarray | None = None, run_cfg=None) -> ForgetSplit:
    """Choose the forget set; deterministic under ``seed``.

    ``scores`` (aligned with training positions) overrides ``cfg.scores``;
    ``model`` is needed for model-based proxies, ``run_cfg`` (the
    ExperimentConfig) for training-based ones.
    """
    if scores is None and cfg.kind == "memorization":
        scores = computed_scores(cfg.scores, bundle, model, device, run_cfg)
    return forget_selection.select_forget_set(cfg, bundle, seed, scores=scores)
