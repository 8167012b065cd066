"""Evaluate a trained model: any subset of the registered metrics, one result table.

``run_metrics(ctx, names)`` is the library core: the context predicts each
split once (logits + penultimate features) and every metric reads those
shared tensors; model-based metrics (sharpness, landscape) draw seeded
sub-samples of a stated size (:class:`~sharp_unlearn.metrics.base.EvalOptions`).

The recipe behind ``sharp-unlearn evaluate`` (rebuild a checkpoint's model,
data, forget set and reference, run the metrics in an MLflow run, write the
tables) is :func:`sharp_unlearn.recipes.evaluate.evaluate_checkpoint`: it sits
with the training recipes because a forget set's proxy scores can need a model
pass or a training run.

MLflow receives the contract names (``mia_efficacy``, ``mia_auc``,
``mia_tpr_at_1fpr``, ``entanglement_variance``, ``entanglement_wasserstein``
and their paper-scale companions ``entanglement_variance_bounded``,
``entanglement_*_classwise_weighted``, ``sharpness_hessian``,
``sharpness_sam``, accuracies, ``tow``) with their headline values, and every
table row as ``<metric>/<split>``.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.metrics import METRICS, EvalContext, MetricValue
from sharp_unlearn.metrics.base import check_requirements

#: the order metrics run and print in; ``all`` means every registered metric
METRIC_ORDER = ("accuracy", "tow", "mia", "entanglement", "sharpness", "landscape", "umap")
#: what ``--metrics auto`` runs: the cheap ones this checkpoint supports (landscape and UMAP on request)
AUTO_METRICS = ("accuracy", "tow", "mia", "entanglement", "sharpness")


def ordered_metric_names() -> list[str]:
    known = METRICS.names()
    return [n for n in METRIC_ORDER if n in known] + [n for n in known if n not in METRIC_ORDER]


def parse_metrics(text: str | Sequence[str]) -> list[str]:
    """``"mia,sharpness"`` -> names; ``all`` expands; unknown names raise listing the choices."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    choices = ordered_metric_names()
    for item in (i.strip() for i in items):
        if not item:
            continue
        expanded = choices if item == "all" else ["auto"] if item == "auto" else [item]
        for name in expanded:
            if name != "auto" and name not in METRICS:
                raise ConfigError(f"unknown metric {name!r}; expected a comma-separated list of: "
                                  f"{', '.join(choices)} (or all, auto)")
            if name not in names:
                names.append(name)
    if not names:
        raise ConfigError(f"no metric requested; expected a comma-separated list of: {', '.join(choices)}")
    return names


def resolve_auto(names: Sequence[str], ctx: EvalContext) -> list[str]:
    """Replace ``auto`` by the default metrics this context can compute."""
    out: list[str] = []
    for name in names:
        if name == "auto":
            for candidate in AUTO_METRICS:
                spec = METRICS.get(candidate)
                has_reference = not spec.needs_reference or ctx.reference is not None
                runnable = all(ctx.has(s) for s in spec.needs) and has_reference
                if runnable and candidate not in out:
                    out.append(candidate)
        elif name not in out:
            out.append(name)
    return out


@dataclass
class EvaluationResult:
    values: list[MetricValue] = field(default_factory=list)
    headline: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    #: wall seconds per metric (shared predictions are charged to the first metric that needs them)
    seconds: dict[str, float] = field(default_factory=dict)
    #: process CPU seconds per metric (what a shared machine's benchmark compares)
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    def value(self, metric: str, split: str) -> float:
        for v in self.values:
            if v.metric == metric and v.split == split:
                return v.value
        raise KeyError(f"no value for metric {metric!r} on split {split!r}")

    def rows(self, *, run_id: str | None, method: str, optimizer: str, dataset: str, forget_set: str,
             seed: int) -> list[dict[str, Any]]:
        """Long-format rows (``sharp_unlearn.results.SCHEMA``)."""
        return [{"run_id": run_id or "", "method": method, "optimizer": optimizer, "dataset": dataset,
                 "forget_set": forget_set, "seed": int(seed), "split": v.split, "metric": v.metric,
                 "value": float(v.value)} for v in self.values]

    def mlflow_metrics(self) -> dict[str, float]:
        flat = {f"{v.metric}/{v.split}": v.value for v in self.values}
        flat.update(self.headline)
        return flat


def run_metrics(ctx: EvalContext, names: Sequence[str],
                progress: Callable[[str], None] | None = None) -> EvaluationResult:
    """Run the named metrics on one context; every requirement is checked before any work."""
    names = resolve_auto(parse_metrics(list(names)), ctx)
    specs = [METRICS.get(n) for n in names]
    for spec in specs:
        check_requirements(spec, ctx)
    result = EvaluationResult()
    for spec in specs:
        if progress is not None:
            progress(spec.name)
        start, cpu_start = time.perf_counter(), time.process_time()
        part = spec.fn(ctx)
        result.seconds[spec.name] = time.perf_counter() - start
        result.cpu_seconds[spec.name] = time.process_time() - cpu_start
        result.values.extend(part.values)
        result.headline.update(part.headline)
        result.artifacts.extend(part.artifacts)
        result.details.update(part.details)
        result.tags.update(part.tags)
    return result
