"""A grid of unlearning runs: seeds x pretrain optimizers x forget levels x methods x unlearn optimizers.

The demo is one cell of it per method; the reproduction table is the full
grid over seeds and memorization levels. A grid spec (YAML) holds:

``base``                 the pretraining ExperimentConfig tree
``pretrain_optimizers``  e.g. ``[sgd, sam]``
``forget``               the forget-set section (``level`` is crossed by ``levels``)
``levels``               optional memorization levels, e.g. ``[low, mid, high]``
``seeds``                optional seeds (default ``[base.seed]``)
``unlearn``              overrides for every unlearning run (optimizer, train)
``unlearn_optimizers``   e.g. ``[sgd, sam]``
``methods``              ``{method: overrides}``; an ``optimizers`` entry there
                         replaces ``unlearn_optimizers`` for that method
                         (Sharp MinMax carries its own SAM pair), an
                         ``optimizer`` entry overrides the optimizer section
                         for that method (e.g. its learning rate)

Pretrained models and retrained references are cached by hash, so re-running
a grid (or growing it) only trains what is new.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharp_unlearn.config import apply_overrides, load_yaml, merge
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.evaluation import parse_metrics, run_metrics
from sharp_unlearn.files import atomic_path
from sharp_unlearn.methods import METHODS
from sharp_unlearn.metrics import EvalContext, EvalOptions
from sharp_unlearn.progress import stage
from sharp_unlearn.recipes.pretrain import train_from_scratch
from sharp_unlearn.recipes.unlearn import load_pretrained, run_unlearning, unlearn_config
from sharp_unlearn.results import SCHEMA, read_results
from sharp_unlearn.stage_checkpoints import load_trained_model
from sharp_unlearn.tracking import check_tracking, client_for
from sharp_unlearn.validation import config_from_dict

REQUIRED = ("base", "forget", "pretrain_optimizers", "unlearn_optimizers")


def load_spec(path: str | None, default: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    spec = apply_overrides(load_yaml(path or default), overrides)
    missing = [k for k in REQUIRED if k not in spec]
    if missing:
        raise ConfigError(f"grid spec lacks {missing[0]!r}; expected keys: {', '.join(REQUIRED)} "
                          "(and optionally levels, seeds, unlearn, methods, evaluate)")
    return spec


def method_of(entry: str) -> str:
    """A methods entry is ``name`` or ``name@label`` (several entries of one method, e.g. tuned per optimizer)."""
    return entry.split("@", 1)[0]


def select_methods(spec: dict[str, Any], methods: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    wanted = dict(spec.get("methods") or {name: {} for name in METHODS.names()})
    for entry in wanted:
        METHODS.get(method_of(entry))  # raises listing the known names
    if methods:
        for name in methods:
            METHODS.get(name)
        wanted = {e: o for e, o in wanted.items() if method_of(e) in methods} or {m: {} for m in methods}
    return {e: dict(o or {}) for e, o in wanted.items() if method_of(e) != "retrain"}


@dataclass
class GridResult:
    #: one row per run: seed, pretrain, level, method, unlearn_opt + metrics (incl. original / retrain rows)
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: long-format result rows (results.SCHEMA + seed/pretrain_optimizer/level columns)
    long_rows: list[dict[str, Any]] = field(default_factory=list)
    #: extra evaluation rows (MIA, entanglement, ...) per run, when an evaluator is given
    evaluation: list[dict[str, Any]] = field(default_factory=list)


def run_grid(spec: dict[str, Any], *, output_dir: str, tracking: dict[str, Any] | None = None,
             methods: Sequence[str] | None = None, seeds: Sequence[int] | None = None, quiet: bool = False,
             evaluator: Callable[..., dict[str, float]] | None = None,
             on_run: Callable[[dict[str, Any]], None] | None = None) -> GridResult:
    """Run the grid; ``evaluator(model, pretrained, split, reference_checkpoint)`` adds metrics per run."""
    tracking = dict(tracking or {})
    wanted = select_methods(spec, methods)
    base_tree = merge(spec["base"], {"output_dir": output_dir, "tracking": tracking})
    check_tracking(config_from_dict(base_tree))  # an unreachable server fails now, not after the first pretrain
    seeds = list(seeds if seeds is not None else spec.get("seeds") or [base_tree.get("seed", 0)])
    levels = list(spec.get("levels") or [spec["forget"].get("level", "high")])
    result = GridResult()
    # the overall position ("stage 7 of 38") over every pretraining and unlearning run
    per_model = len(levels) * sum(len(over.get("optimizers") or spec["unlearn_optimizers"]) for over in wanted.values())
    total = len(seeds) * len(spec["pretrain_optimizers"]) * (1 + per_model)
    done = 0
    for seed in seeds:
        for pre_opt in spec["pretrain_optimizers"]:
            pre_cfg = config_from_dict(merge(base_tree, {"seed": seed, "optimizer": {"name": pre_opt}}))
            done += 1
            stage(done, total, f"pretrain {pre_opt} (seed {seed})", quiet)
            outcome = train_from_scratch(pre_cfg, quiet=quiet)
            pretrained = load_pretrained(outcome.checkpoint)
            for level in levels:
                forget = merge(copy.deepcopy(spec["forget"]), {"level": level})
                split = None
                for entry, method_over in wanted.items():
                    method_name = method_of(entry)
                    method_over = dict(method_over)
                    optimizers = method_over.pop("optimizers", None) or spec["unlearn_optimizers"]
                    optimizer_over = dict(method_over.pop("optimizer", None) or {})
                    for un_opt in optimizers:
                        tree = merge(unlearn_config(pretrained), copy.deepcopy(spec.get("unlearn", {})))
                        tree = merge(tree, {"optimizer": {**optimizer_over, "name": un_opt}, "forget": forget,
                                            "method": {"name": method_name, **method_over},
                                            "output_dir": output_dir, "tracking": tracking})
                        cfg = config_from_dict(tree)
                        done += 1
                        stage(done, total, f"unlearn {method_name}/{un_opt} from {pre_opt} ({level}, seed {seed})",
                              quiet)
                        run = run_unlearning(cfg, outcome.checkpoint, quiet=quiet, pretrained=pretrained, split=split)
                        split = run.split  # one selection per (pretrained model, level), shared by all methods
                        key = {"seed": seed, "pretrain": pre_opt, "level": level}
                        # several entries of one method (``name@label``) stay apart in the rows
                        labelled = {"entry": entry} if entry != method_name else {}
                        if not any(r["method"] == "original" and all(r[k] == v for k, v in key.items())
                                   for r in result.rows):
                            result.rows.append({**key, "method": "original", "unlearn_opt": "-",
                                                **run.original_metrics, "wall_seconds": 0.0})
                            result.rows.append({**key, "method": "retrain", "unlearn_opt": "-",
                                                **run.reference.metrics, "tow": 1.0})
                            if evaluator is not None:
                                ref_model, _, _ = load_trained_model(run.reference.checkpoint)
                                result.evaluation.append({**key, "method": "original", "unlearn_opt": "-", **evaluator(
                                    pretrained.model("cpu"), pretrained, split, run.reference.checkpoint)})
                                result.evaluation.append({**key, "method": "retrain", "unlearn_opt": "-", **evaluator(
                                    ref_model, pretrained, split, run.reference.checkpoint)})
                        row = {**key, "method": method_name, "unlearn_opt": run.optimizer_tag, **labelled,
                               "run_id": run.run_id, **run.metrics}
                        result.rows.append(row)
                        if evaluator is not None and run.checkpoint is not None:
                            model, _, _ = load_trained_model(run.checkpoint)
                            measured = evaluator(model, pretrained, split, run.reference.checkpoint)
                            result.evaluation.append({**key, "method": method_name, "unlearn_opt": run.optimizer_tag,
                                                      **labelled, **measured})
                            _log_to_run(cfg, run.run_id, measured)
                        for long in read_results(run.results_path).to_pylist():
                            if long["method"] in ("original", "retrain") and any(
                                    r["method"] == long["method"] and r["run_id"] == long["run_id"]
                                    and r["metric"] == long["metric"] and r["level"] == level
                                    for r in result.long_rows):
                                continue
                            result.long_rows.append({**long, "pretrain_optimizer": pre_opt, "level": level})
                        if on_run is not None:
                            on_run(row)
    return result


def model_evaluator(metric_names: Sequence[str], out_dir: Path, seed: int = 0):
    """An ``evaluator`` for :func:`run_grid` from the evaluation suite (MIA, entanglement, ...).

    Works on the in-memory model and split (no reloading); returns the headline
    metrics (``mia_efficacy``, ``entanglement_variance``, ...).
    """
    import numpy as np
    from torch.utils.data import Subset

    names = parse_metrics(list(metric_names))
    references: dict[str, Any] = {}

    def evaluate(model, pretrained, split, reference_checkpoint) -> dict[str, float]:
        bundle = pretrained.bundle
        key = str(reference_checkpoint)
        if key not in references:
            references[key] = load_trained_model(reference_checkpoint)[0].eval()
        splits = {"test": bundle.test, "val": bundle.val,
                  "retain": Subset(bundle.train_eval, np.asarray(split.retain_positions).tolist()),
                  "forget": Subset(bundle.train_eval, np.asarray(split.forget_positions).tolist())}
        ctx = EvalContext(model.eval(), splits, reference=references[key], device="cpu", options=EvalOptions(),
                          out_dir=out_dir, seed=seed, num_classes=bundle.num_classes)
        return dict(run_metrics(ctx, names).headline)

    return evaluate


def _log_to_run(cfg, run_id: str | None, metrics: dict[str, float]) -> None:
    """Add evaluation metrics (MIA, entanglement, ...) to an already finished unlearning run."""
    if not run_id or not cfg.tracking.enabled or not metrics:
        return
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, 0) for k, v in metrics.items()
              if isinstance(v, (int, float)) and v == v]
    client_for(cfg.tracking.uri).log_batch(run_id, metrics=values)


def write_long(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Long-format table with the grid's extra columns (seed is already in the schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = SCHEMA.append(pa.field("pretrain_optimizer", pa.string())).append(pa.field("level", pa.string()))
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
