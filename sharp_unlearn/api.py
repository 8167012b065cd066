"""The Python API: ``from sharp_unlearn import pretrain, unlearn, evaluate, sweep``.

The same jobs as the command line, for notebooks and scripts::

    from sharp_unlearn import pretrain, unlearn, evaluate

    pre = pretrain(data="digits", optimizer={"name": "sam", "rho": 0.05}, **{"train.epochs": 2})
    out = unlearn(pre, method="neggrad", forget={"kind": "random", "size": 60})
    print(out.metrics["tow"], evaluate(out, metrics="mia").metrics)

Settings are keyword arguments: a section as a dict (``optimizer={"name": "sam"}``)
or by name (``model="small_cnn"``), a dotted key (``**{"train.epochs": 2}``), or a
scalar (``seed=1``); ``config``
takes an :class:`~sharp_unlearn.config.ExperimentConfig`, a dict tree or a YAML
path first. Bad values raise :class:`~sharp_unlearn.errors.ConfigError` with the
message the CLI prints. MLflow tracking is off unless asked for
(``tracking=True`` for the default store, or a tracking URI): nothing writes
``mlruns.db`` behind a notebook's back.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# lazy: the sharp_unlearn imports inside the functions below keep `import sharp_unlearn.api` cheap: the
# recipes they reach import torch, and mlflow or ray when a run tracks or sweeps

__all__ = ["EvaluateResult", "PretrainResult", "SweepResult", "UnlearnResult", "evaluate", "pretrain", "sweep",
           "unlearn"]


@dataclass
class PretrainResult:
    model: Any  # torch.nn.Module, on the CPU, in eval mode
    metrics: dict[str, float]
    checkpoint: Path
    run_id: str | None
    config: Any  # ExperimentConfig
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class UnlearnResult:
    model: Any
    metrics: dict[str, float]
    checkpoint: Path | None
    run_id: str | None
    config: Any
    original_metrics: dict[str, float] = field(default_factory=dict)
    reference_metrics: dict[str, float] = field(default_factory=dict)
    reference_checkpoint: Path | None = None
    results_path: Path | None = None
    split_hash: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class EvaluateResult:
    #: headline metrics under their MLflow names (``mia_efficacy``, ``tow``, ...)
    metrics: dict[str, float]
    #: every value: dicts with metric, split, value
    values: list[dict[str, Any]]
    results_path: Path
    out_dir: Path
    artifacts: list[Path]
    run_id: str | None


@dataclass
class SweepResult:
    best: dict[str, Any] | None
    rows: list[dict[str, Any]]
    best_config_path: str | None
    results_path: str | None
    parent_run_id: str | None
    name: str


# ------------------------------------------------------------------ settings
#: sections a bare string names (``model="small_cnn"``)
_NAMED_SECTIONS = ("data", "model", "optimizer", "method")


def _overrides(settings: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key=value`` overrides (JSON values, which YAML reads back with their types) of nested settings."""
    out: list[str] = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        # a section given as a dict sets its keys one by one; `options` dicts are values of their own
        if isinstance(value, Mapping) and key != "options":
            out += _overrides(value, name + ".")
        elif not prefix and key in _NAMED_SECTIONS and isinstance(value, str):
            out.append(f"{name}.name={json.dumps(value)}")  # data="digits" is data.name="digits"
        else:
            out.append(f"{name}={json.dumps(_plain(value))}")
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _tracking(tracking: bool | str) -> list[str]:
    if tracking is False or tracking is None:
        return ["tracking.enabled=false"]
    if tracking is True:
        return ["tracking.enabled=true"]
    if isinstance(tracking, str):
        return ["tracking.enabled=true", f"tracking.uri={json.dumps(tracking)}"]
    from sharp_unlearn.errors import ConfigError

    raise ConfigError(f"tracking={tracking!r} is not valid; expected False, True or a tracking URI string")


def _resolve(config: Any, settings: Mapping[str, Any], tracking: bool | str, base: dict | None = None):
    """An ExperimentConfig from ``base``, then ``config``, then ``settings``, then the tracking choice."""
    from sharp_unlearn.config import ExperimentConfig, merge
    from sharp_unlearn.validation import load_config

    files: list[str] = []
    tree = dict(base or {})
    if isinstance(config, ExperimentConfig):
        tree = merge(tree, config.to_dict())
    elif isinstance(config, Mapping):
        tree = merge(tree, dict(config))
    elif isinstance(config, (str, os.PathLike)):
        files = [os.fspath(config)]
    elif config is not None:
        from sharp_unlearn.errors import ConfigError

        raise ConfigError(f"config={config!r} is not valid; expected an ExperimentConfig, a dict or a YAML path")
    return load_config(files, [*_overrides(settings), *_tracking(tracking)], base=tree)


def _checkpoint_path(checkpoint: Any) -> str:
    """A path from a path, or from the result of an earlier call."""
    from sharp_unlearn.errors import ConfigError

    path = getattr(checkpoint, "checkpoint", checkpoint)
    if path is None:
        raise ConfigError("that result has no checkpoint; expected a run that saved its model")
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"checkpoint={checkpoint!r} is not valid; expected a path or a pretrain/unlearn result")
    return os.fspath(path)


def _load_model(checkpoint: Path | None, cfg):
    if checkpoint is None:
        return None
    from sharp_unlearn.stage_checkpoints import load_trained_model

    model, _, _ = load_trained_model(checkpoint, cfg, "cpu")
    return model.eval()


# ------------------------------------------------------------------ the jobs
def pretrain(config: Any = None, *, tracking: bool | str = False, quiet: bool = False, resume: bool = True,
             **settings: Any) -> PretrainResult:
    """Train a model (``optimizer={"name": "sam"}`` for SAM); returns the model, metrics and checkpoint."""
    from sharp_unlearn.commands.base import check_output_dir
    from sharp_unlearn.recipes.pretrain import train_from_scratch

    cfg = _resolve(config, settings, tracking)
    check_output_dir(cfg.output_dir)
    outcome = train_from_scratch(cfg, quiet=quiet, resume=resume, use_cache=False)
    return PretrainResult(_load_model(outcome.checkpoint, cfg), dict(outcome.metrics), Path(outcome.checkpoint),
                          outcome.run_id, cfg, list(outcome.history))


def unlearn(checkpoint: Any, config: Any = None, *, tracking: bool | str = False, quiet: bool = False,
            **settings: Any) -> UnlearnResult:
    """Unlearn ``forget`` from a pretrained checkpoint (a path or a :class:`PretrainResult`) with ``method``."""
    from sharp_unlearn.commands.base import check_output_dir
    from sharp_unlearn.recipes.unlearn import load_pretrained, run_unlearning, unlearn_config

    path = _checkpoint_path(checkpoint)
    pretrained = load_pretrained(path)
    cfg = _resolve(config, settings, tracking, base=unlearn_config(pretrained))
    check_output_dir(cfg.output_dir)
    outcome = run_unlearning(cfg, path, quiet=quiet, pretrained=pretrained)
    return UnlearnResult(
        _load_model(outcome.checkpoint, cfg), dict(outcome.metrics), outcome.checkpoint, outcome.run_id, cfg,
        original_metrics=dict(outcome.original_metrics), reference_metrics=dict(outcome.reference.metrics),
        reference_checkpoint=outcome.reference.checkpoint, results_path=outcome.results_path,
        split_hash=outcome.split.split_hash, history=list(outcome.history))


def evaluate(checkpoint: Any, metrics: str | Sequence[str] = "auto", *, out_dir: str | os.PathLike | None = None,
             reference: Any = None, options: Mapping[str, Any] | None = None, tracking: bool | str = False,
             **settings: Any) -> EvaluateResult:
    """Evaluate a checkpoint (path or result): ``metrics="mia,landscape"``, a list, ``"all"`` or ``"auto"``.

    ``options`` are the evaluation knobs of ``--eval-option`` (``{"sharpness_samples": 256}``);
    ``settings`` override the checkpoint's config (a forget set for a pretrained model).
    """
    from sharp_unlearn.evaluation import parse_metrics
    from sharp_unlearn.metrics import EvalOptions
    from sharp_unlearn.recipes.evaluate import evaluate_checkpoint

    names = parse_metrics(metrics)
    eval_options = EvalOptions.from_pairs([f"{k}={v}" for k, v in (options or {}).items()])
    outcome = evaluate_checkpoint(_checkpoint_path(checkpoint), names, out_dir=out_dir, options=eval_options,
                                  overrides=[*_overrides(settings), *_tracking(tracking)],
                                  reference=_checkpoint_path(reference) if reference is not None else None)
    result = outcome.result
    return EvaluateResult(dict(result.headline), [v._asdict() for v in result.values], Path(outcome.results_path),
                          Path(outcome.out_dir), [Path(a) for a in result.artifacts], outcome.run_id)


def sweep(file: str | os.PathLike, *, num_samples: int | None = None, max_concurrent: int | None = None,
          storage: str | None = None, name: str | None = None, num_cpus: int | None = None,
          address: str | None = None, tracking: bool | str = False, quiet: bool = False,
          **settings: Any) -> SweepResult:
    """Run a Ray Tune sweep file (``tuning/*.yaml``); ``settings`` override its keys
    (``**{"base.train.epochs": 3}``)."""
    from sharp_unlearn.tuning import load_sweep, run_sweep

    track: dict[str, Any] = {"enabled": tracking is not False and tracking is not None}
    if isinstance(tracking, str):
        track["uri"] = tracking
    spec = load_sweep(os.fspath(file), _overrides(settings), num_samples=num_samples,
                      max_concurrent=max_concurrent, storage=storage, name=name, tracking=track)
    outcome = run_sweep(spec, address=address, num_cpus=num_cpus, quiet=quiet)
    return SweepResult(outcome.best, list(outcome.rows), outcome.best_config_path, outcome.results_path,
                       outcome.parent_run_id, outcome.name)
