"""Run comparison: select MLflow runs, lay them side by side, summarise over seeds, plot.

The table has one row per run: who it is (run id, name, status and the
contract tags ``kind``, ``method``, ``optimizer``, ``dataset``, ``model``,
``forget_set``, ``seed``), the hyper-parameters that differ between the
selected runs (``optimizer.rho``, ``method.alpha``...), and the final
metrics exactly as MLflow holds them (``run.data.metrics``). The summary
groups runs by (kind, method, optimizer, dataset, forget_set) and reports the
mean and the 95 % confidence interval over seeds (Student t).

Outputs (``write_report``): ``comparison.{md,csv,parquet}``,
``summary.{csv,parquet}``, ``results.parquet`` (the long format of
``sharp_unlearn.results``), ``figures/*.png`` and ``report.html``, which is
self-contained: the plots are embedded as base64 PNG, no external files.

mlflow and matplotlib are imported lazily (extras ``mlflow``, ``analysis``).
"""
from __future__ import annotations

import base64
import contextlib
import html
import io
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharp_unlearn.errors import ConfigError, require

#: identity columns, from run info and the contract tags (the README's "Names users query")
ID_COLUMNS = ("run_id", "run_name", "status", "kind", "method", "optimizer", "pretrain_optimizer", "dataset", "model",
              "forget_set", "seed")
TAG_COLUMNS = ("kind", "method", "optimizer", "pretrain_optimizer", "dataset", "model", "forget_set", "seed")
#: identity columns shown only when some run has them (unlearning runs name the pretraining optimizer)
OPTIONAL_ID_COLUMNS = ("pretrain_optimizer",)
#: the rows every unlearning table needs as anchors, read from the runs' result tables
BASELINE_METHODS = ("original", "retrain")
#: final metrics in the order a reader scans them (contract names first)
METRIC_ORDER = ("tow", "forget_acc", "retain_acc", "test_acc", "val_acc", "train_acc", "train_loss",
                "mia_efficacy", "mia_auc", "mia_tpr_at_1fpr", "entanglement_variance",
                "entanglement_wasserstein", "sharpness_hessian", "sharpness_sam", "wall_seconds")
#: per-step bookkeeping (learning rate, per-objective losses) left out unless asked for by name
NOISE_METRICS = ("lr",)
NOISE_PREFIX = "loss_"
#: hyper-parameters shown when they differ between the selected runs (sweeps vary these)
SWEEP_PARAMS = ("optimizer.name", "optimizer.rho", "optimizer.lamb", "optimizer.sign", "optimizer.lr",
                "method.alpha", "method.mask_fraction", "method.epochs", "method.rho_min", "method.rho_max",
                "method.lamb_min", "method.lamb_max", "method.temperature", "train.epochs", "data.label_noise")
#: lineage tags kept in the table so a reader can walk the chain
LINEAGE_COLUMNS = ("pretrain_run_id", "reference_run_id")
SUMMARY_KEYS = ("kind", "method", "optimizer", "dataset", "forget_set")


# --------------------------------------------------------------------------- selection
def _mlflow_error(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:400]


def select_runs(client, *, experiments: Sequence[str] = (), filter_string: str | None = None,
                run_ids: Sequence[str] = (), max_results: int = 1000, with_lineage: bool = False) -> list:
    """Runs matching every criterion given; ConfigError when a name is unknown or nothing matches.

    ``experiments``: names (all active experiments when only a filter is
    given); ``filter_string``: as in ``mlflow.search_runs``
    (``"tags.kind = 'unlearn' and metrics.tow > 0.9"``); ``run_ids``: exact
    runs. ``with_lineage`` adds the pretrain and retrain-reference runs the
    selected runs name in their ``pretrain_run_id`` / ``reference_run_id`` tags.
    """
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    run_ids = [r for r in run_ids if r]
    experiment_ids: list[str] = []
    for name in experiments:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            known = sorted(e.name for e in client.search_experiments())
            raise ConfigError(f"experiment {name!r} does not exist; known experiments: {', '.join(known) or 'none'}")
        experiment_ids.append(experiment.experiment_id)

    runs: list = []
    if run_ids and not filter_string and not experiment_ids:
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException:
                raise ConfigError(f"run id {run_id!r} does not exist in this tracking store") from None
    else:
        if not experiment_ids:
            experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        # MLflow filters are conjunctions without parentheses, so clauses simply join with "and"
        clauses = [filter_string] if filter_string else []
        if run_ids:
            quoted = ", ".join(f"'{r}'" for r in run_ids)
            clauses.append(f"attributes.run_id IN ({quoted})")
        full_filter = " and ".join(clauses)
        token = None
        try:
            while len(runs) < max_results:
                page = client.search_runs(experiment_ids, full_filter, ViewType.ACTIVE_ONLY,
                                          max_results=min(1000, max_results - len(runs)),
                                          order_by=["attributes.start_time ASC"], page_token=token)
                runs.extend(page)
                token = page.token
                if not token:
                    break
        except MlflowException as exc:
            raise ConfigError(f"filter {filter_string!r} is not valid: {_mlflow_error(exc)}") from None
        # earlier reports are runs too (kind=compare): never compare a report with itself
        runs = [r for r in runs if r.data.tags.get("kind") != "compare" or r.info.run_id in run_ids]
    if not runs:
        where = f"experiments {list(experiments)}" if experiments else "all experiments"
        raise ConfigError(f"no runs matched (filter={filter_string!r}, run ids={run_ids or None}) in {where}")
    if with_lineage:
        runs = _add_lineage(client, runs)
    return runs


def _add_lineage(client, runs: list) -> list:
    from sharp_unlearn.tracking import lineage

    seen = {r.info.run_id for r in runs}
    extra = []
    for run in runs:
        for role, linked in lineage(client, run.info.run_id):
            if role in LINEAGE_COLUMNS and linked.info.run_id not in seen:
                seen.add(linked.info.run_id)
                extra.append(linked)
    return extra + runs  # references first: they are the rows others are read against


# --------------------------------------------------------------------------- the table
@dataclass
class Comparison:
    """One row per run plus the column groups; ``params`` keeps every curated param per run for plots."""

    rows: list[dict[str, Any]]
    id_columns: list[str]
    param_columns: list[str]
    metric_columns: list[str]
    lineage_columns: list[str]
    params: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return [*self.id_columns, *self.param_columns, *self.metric_columns, *self.lineage_columns]

    def table_rows(self) -> list[dict[str, Any]]:
        cols = self.columns
        return [{c: row.get(c) for c in cols} for row in self.rows]


def parse_value(text: Any) -> Any:
    """MLflow stores params/tags as strings; give numbers back as numbers, 'None' as None."""
    if text is None or not isinstance(text, str):
        return text
    if text in ("None", "null", ""):
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    if number.is_integer() and text.lstrip("-").isdigit():
        return int(text)
    return number


def _is_noise(metric: str) -> bool:
    return metric in NOISE_METRICS or metric.startswith(NOISE_PREFIX)


@contextlib.contextmanager
def _no_download_bars():
    """MLflow draws a progress bar per artifact download; one per run is noise in a report."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def baseline_rows(client, runs: Iterable) -> list[dict[str, Any]]:
    """The "do nothing" (``original``) and ``retrain`` reference rows of the selected unlearning runs.

    Unlearning runs log their result table (``results/*.parquet``, long format)
    with the original model and the retrained reference scored on the same
    forget set; those rows become table rows with ``status='baseline'``. A
    run without that artifact contributes nothing.
    """
    import tempfile

    import pyarrow.parquet as pq

    found: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        if run.data.tags.get("kind") != "unlearn":
            continue
        with tempfile.TemporaryDirectory() as tmp, _no_download_bars():
            try:
                local = Path(client.download_artifacts(run.info.run_id, "results", tmp))
            except Exception:  # noqa: BLE001 - no result table logged: nothing to add
                continue
            for file in sorted(local.glob("*.parquet")):
                for record in pq.read_table(file).to_pylist():
                    if record.get("method") not in BASELINE_METHODS or not record.get("run_id"):
                        continue
                    key = (record["method"], record["run_id"], record.get("forget_set"), record.get("seed"))
                    row = found.setdefault(key, {
                        "run_id": record["run_id"], "run_name": record["method"], "status": "baseline",
                        "kind": record["method"], "method": record["method"],
                        "optimizer": record.get("optimizer"), "pretrain_optimizer": record.get("optimizer"),
                        "dataset": record.get("dataset"), "model": run.data.tags.get("model"),
                        "forget_set": record.get("forget_set"), "seed": record.get("seed")})
                    row[record["metric"]] = float(record["value"])
    return list(found.values())


def build_comparison(runs: Iterable, *, metrics: Sequence[str] | None = None, params: Sequence[str] = (),
                     all_params_varying: bool = True,
                     baselines: Sequence[Mapping[str, Any]] = ()) -> Comparison:
    """The side-by-side table of ``runs`` (MLflow Run objects) plus ``baselines`` rows (see baseline_rows).

    ``metrics``: metric columns to show (default: the contract metrics present,
    then any other final metric that is not per-step bookkeeping). ``params``:
    param columns always shown; curated sweep params are added when they differ.
    A baseline ``retrain`` row whose run is itself selected fills that row's
    missing metrics (its forget/retain accuracy) instead of adding a row.
    """
    runs = list(runs)
    rows: list[dict[str, Any]] = []
    curated: dict[str, dict[str, Any]] = {}
    present_metrics: set[str] = set()
    for run in runs:
        tags = run.data.tags
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name or tags.get("mlflow.runName", ""),
            "status": run.info.status,
        }
        for tag in TAG_COLUMNS:
            row[tag] = parse_value(tags.get(tag)) if tag == "seed" else tags.get(tag)
        for tag in LINEAGE_COLUMNS:
            row[tag] = tags.get(tag)
        row.update({k: float(v) for k, v in run.data.metrics.items()})
        present_metrics.update(run.data.metrics)
        wanted = set(SWEEP_PARAMS) | set(params)
        curated[run.info.run_id] = {k: parse_value(v) for k, v in run.data.params.items() if k in wanted}
        rows.append(row)
    by_id = {(r["run_id"], r["kind"]): r for r in rows}
    for baseline in baselines:
        selected = by_id.get((baseline["run_id"], baseline["kind"]))
        if selected is not None:
            for key, value in baseline.items():
                if key not in ("run_id", "run_name", "status", "kind") and selected.get(key) is None:
                    selected[key] = value
        else:
            rows.append(dict(baseline))
        present_metrics.update(k for k, v in baseline.items() if k not in ID_COLUMNS and isinstance(v, float))

    if metrics:
        metric_columns = list(metrics)
    else:
        metric_columns = [m for m in METRIC_ORDER if m in present_metrics]
        metric_columns += sorted(m for m in present_metrics if m not in METRIC_ORDER and not _is_noise(m))
    param_columns = list(params)
    if all_params_varying:
        for key in SWEEP_PARAMS:
            # baseline rows (the do-nothing model, the reference) may come from runs outside the selection
            values = {curated.get(r["run_id"], {}).get(key) for r in rows if r["status"] != "baseline"}
            if key not in param_columns and len(values - {None}) > 1:
                param_columns.append(key)
    for row in rows:
        for key in param_columns:
            row[key] = None if row["status"] == "baseline" else curated.get(row["run_id"], {}).get(key)
    lineage_columns = [c for c in LINEAGE_COLUMNS if any(r.get(c) for r in rows)]
    id_columns = [c for c in ID_COLUMNS if c not in OPTIONAL_ID_COLUMNS or any(r.get(c) for r in rows)]
    return Comparison(rows, id_columns, param_columns, metric_columns, lineage_columns, curated)


# --------------------------------------------------------------------------- summary over seeds
def mean_ci95(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the half-width of the 95 % confidence interval (Student t); None for one value."""
    from sharp_unlearn.metrics.tow import mean_ci95 as _mean_ci95

    mean, half = _mean_ci95(values)
    return mean, None if half != half else half


def summary_keys(comparison: Comparison) -> list[str]:
    """Runs that differ only in seed form a group: contract keys plus the params that vary."""
    optional = [c for c in OPTIONAL_ID_COLUMNS if c in comparison.id_columns]
    return [*SUMMARY_KEYS, *optional, *comparison.param_columns]


def summarize(comparison: Comparison, by: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Mean and 95 % CI over the runs (seeds) of each group, for every metric column."""
    by = summary_keys(comparison) if by is None else list(by)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in comparison.rows:
        groups[tuple(row.get(k) for k in by)].append(row)
    out = []
    for key, members in groups.items():
        summary: dict[str, Any] = dict(zip(by, key, strict=True))
        summary["n"] = len(members)
        summary["seeds"] = ",".join(str(m.get("seed")) for m in members)
        for metric in comparison.metric_columns:
            values = [m[metric] for m in members if m.get(metric) is not None and not _isnan(m[metric])]
            if values:
                mean, ci = mean_ci95(values)
                summary[f"{metric}_mean"], summary[f"{metric}_ci95"] = mean, ci
            else:
                summary[f"{metric}_mean"], summary[f"{metric}_ci95"] = None, None
        out.append(summary)
    return out


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and value != value


# --------------------------------------------------------------------------- text formats
def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def _short(value: Any, column: str) -> str:
    text = fmt(value)
    return text[:8] if column in ("run_id", *LINEAGE_COLUMNS) and text else text


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], short_ids: bool = False) -> str:
    def cell(value: Any, column: str) -> str:
        text = _short(value, column) if short_ids else fmt(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c), c) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary_display(comparison: Comparison, summary: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict]]:
    """Summary rows with ``mean ± ci`` cells, for Markdown / HTML / terminal."""
    keys = summary_keys(comparison)
    columns = [*keys, "n", *comparison.metric_columns]
    rows = []
    for item in summary:
        row = {k: item.get(k) for k in (*keys, "n")}
        for metric in comparison.metric_columns:
            mean, ci = item.get(f"{metric}_mean"), item.get(f"{metric}_ci95")
            row[metric] = "" if mean is None else (fmt(mean) if ci is None else f"{fmt(mean)} ± {fmt(ci)}")
        rows.append(row)
    return columns, rows


def render_markdown(comparison: Comparison, summary: Sequence[Mapping[str, Any]], title: str) -> str:
    columns, rows = summary_display(comparison, summary)
    return (f"# {title}\n\n## Summary (mean ± 95 % CI over seeds)\n\n{markdown_table(columns, rows)}\n"
            f"## Runs\n\n{markdown_table(comparison.columns, comparison.rows)}")


def _arrow_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]):
    """A pyarrow table with one type per column: float/int when every value is numeric, else string."""
    import pyarrow as pa

    arrays = {}
    for column in columns:
        values = [row.get(column) for row in rows]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, bool) for v in present):
            arrays[column] = pa.array(values, pa.bool_())
        elif present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
            arrays[column] = pa.array(values, pa.int64())
        elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            arrays[column] = pa.array([None if v is None else float(v) for v in values], pa.float64())
        else:
            arrays[column] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(arrays)


def long_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """The long result format (one row per run x metric), as ``sharp_unlearn.results`` writes it."""
    from sharp_unlearn.results import rows_from_metrics

    out = []
    for row in comparison.rows:
        seed = row.get("seed")
        out += rows_from_metrics({m: row.get(m) for m in comparison.metric_columns}, run_id=row["run_id"],
                                 method=row.get("method") or row.get("kind") or "",
                                 optimizer=row.get("optimizer") or "", dataset=row.get("dataset") or "",
                                 forget_set=row.get("forget_set") or "",
                                 seed=seed if isinstance(seed, int) else -1)
    return out


# --------------------------------------------------------------------------- plots
def _optimizer_label(row: Mapping[str, Any]) -> str:
    """The unlearning optimizer, with the pretraining one when runs name it (SGD- vs SAM-pretrained models)."""
    label = str(row.get("optimizer") or "?")
    pre = row.get("pretrain_optimizer")
    return f"{label} [pre {pre}]" if pre and row.get("kind") == "unlearn" else label


def _group_label(row: Mapping[str, Any]) -> str:
    kind = row.get("kind") or "?"
    if kind == "unlearn":
        return f"{row.get('method') or '?'} / {_optimizer_label(row)}"
    return f"{kind} / {row.get('optimizer') or '?'}"


def _figure(width: float = 7.0, height: float = 4.0):
    # Figure without pyplot: no global state, no GUI backend, safe in threads
    require("matplotlib", "analysis")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _grouped(rows: Sequence[Mapping[str, Any]], metric: str, key) -> dict[Any, list[float]]:
    groups: dict[Any, list[float]] = defaultdict(list)
    for row in rows:
        value = row.get(metric)
        if value is not None and not _isnan(value):
            groups[key(row)].append(float(value))
    return groups


def plot_tow_by_method(comparison: Comparison):
    """Grouped bars: ToW per method, one bar per optimizer, mean ± 95 % CI over seeds."""
    rows = [r for r in comparison.rows if r.get("tow") is not None and r.get("kind") == "unlearn"]
    if not rows:
        return None
    methods = sorted({r.get("method") or "?" for r in rows})
    optimizers = sorted({_optimizer_label(r) for r in rows})
    groups = _grouped(rows, "tow", lambda r: (r.get("method") or "?", _optimizer_label(r)))
    fig = _figure(max(5.0, 1.3 * len(methods) * max(1, len(optimizers)) ** 0.5 + 3))
    ax = fig.add_subplot()
    width = 0.8 / len(optimizers)
    for j, opt in enumerate(optimizers):
        xs, means, errs = [], [], []
        for i, method in enumerate(methods):
            values = groups.get((method, opt))
            if not values:
                continue
            mean, ci = mean_ci95(values)
            xs.append(i - 0.4 + width * (j + 0.5))
            means.append(mean)
            errs.append(ci or 0.0)
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=opt)
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_ylabel("ToW (higher is better)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Tug of war by method and optimizer (mean ± 95 % CI)")
    ax.legend(title="optimizer", fontsize=8)
    return fig


def plot_accuracies(comparison: Comparison):
    """Forget / retain / test accuracy bars per method-optimizer group (retrain reference included)."""
    metrics = [m for m in ("forget_acc", "retain_acc", "test_acc")
               if any(r.get(m) is not None for r in comparison.rows)]
    rows = [r for r in comparison.rows if r.get("forget_acc") is not None or r.get("retain_acc") is not None]
    if not rows or not metrics:
        return None
    labels = sorted({_group_label(r) for r in rows}, key=lambda s: (not s.startswith("retrain"), s))
    fig = _figure(max(6.0, 1.1 * len(labels) + 3))
    ax = fig.add_subplot()
    width = 0.8 / len(metrics)
    for j, metric in enumerate(metrics):
        groups = _grouped(rows, metric, _group_label)
        xs, means, errs = [], [], []
        for i, label in enumerate(labels):
            if groups.get(label):
                mean, ci = mean_ci95(groups[label])
                xs.append(i - 0.4 + width * (j + 0.5))
                means.append(mean)
                errs.append(ci or 0.0)
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=metric.replace("_acc", ""))
    ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Accuracy on the forget, retain and test sets")
    ax.legend(fontsize=8)
    return fig


#: params that only mean something under a sharpness-aware optimizer (plain SGD logs them too, unused)
SAM_ONLY_PARAMS = ("optimizer.rho", "optimizer.lamb", "optimizer.sign")


def plot_tow_vs_param(comparison: Comparison, param: str):
    """ToW against a swept hyper-parameter, one line per method-optimizer group; None unless it varies."""
    points = []
    for row in comparison.rows:
        if row.get("kind") != "unlearn":
            continue
        if param in SAM_ONLY_PARAMS and "sam" not in str(row.get("optimizer") or ""):
            continue
        x = comparison.params.get(row["run_id"], {}).get(param)
        if isinstance(x, (int, float)) and row.get("tow") is not None:
            points.append((_group_label(row), float(x), float(row["tow"])))
    if len({p[1] for p in points}) < 2:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for label in sorted({p[0] for p in points}):
        by_x: dict[float, list[float]] = defaultdict(list)
        for lab, x, y in points:
            if lab == label:
                by_x[x].append(y)
        xs = sorted(by_x)
        stats = [mean_ci95(by_x[x]) for x in xs]
        ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] or 0.0 for s in stats], marker="o", capsize=3,
                    label=label)
    ax.set_xlabel(param)
    ax.set_ylabel("ToW")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"ToW against {param}")
    ax.legend(fontsize=8)
    return fig


def _bars(comparison: Comparison, metrics: Sequence[str], title: str, ylabel: str):
    metrics = [m for m in metrics if any(r.get(m) is not None for r in comparison.rows)]
    if not metrics:
        return None
    rows = [r for r in comparison.rows if any(r.get(m) is not None for m in metrics)]
    labels = sorted({_group_label(r) for r in rows})
    fig = _figure(6.0 + 1.5 * (len(metrics) - 1), 4.0)
    axes = [fig.add_subplot(1, len(metrics), i + 1) for i in range(len(metrics))]
    for ax, metric in zip(axes, metrics, strict=True):
        groups = _grouped(rows, metric, _group_label)
        present = [label for label in labels if groups.get(label)]
        stats = [mean_ci95(groups[label]) for label in present]
        ax.bar(range(len(present)), [s[0] for s in stats], yerr=[s[1] or 0.0 for s in stats], capsize=3)
        ax.set_xticks(range(len(present)), present, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    return fig


def plot_mia(comparison: Comparison):
    return _bars(comparison, ("mia_efficacy", "mia_auc", "mia_tpr_at_1fpr"), "Membership inference (SVC-MIA)",
                 "score")


def plot_entanglement(comparison: Comparison):
    return _bars(comparison, ("entanglement_variance", "entanglement_wasserstein"),
                 "Retain / forget entanglement", "score")


def plot_tow_vs_wall(comparison: Comparison):
    """ToW against wall time: unlearning exists to be cheaper than retraining."""
    rows = [r for r in comparison.rows if r.get("tow") is not None and r.get("wall_seconds") is not None]
    if not rows:
        return None
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    for label in sorted({_group_label(r) for r in rows}):
        members = [r for r in rows if _group_label(r) == label]
        ax.scatter([r["wall_seconds"] for r in members], [r["tow"] for r in members], label=label)
    retrain_seconds = sorted({r["wall_seconds"] for r in comparison.rows
                              if r.get("kind") == "retrain" and r.get("wall_seconds") is not None})
    for i, seconds in enumerate(retrain_seconds):  # the cost unlearning is meant to undercut
        ax.axvline(seconds, color="grey", linestyle="--", linewidth=1, label="retrain" if i == 0 else None)
    ax.set_xlabel("wall seconds")
    ax.set_ylabel("ToW")
    ax.set_ylim(0, 1.05)
    ax.set_title("ToW against wall time")
    ax.legend(fontsize=8)
    return fig


def build_figures(comparison: Comparison) -> dict[str, Any]:
    """Every plot the data supports, by file stem; plots without data are left out."""
    candidates = {
        "tow_by_method_optimizer": plot_tow_by_method(comparison),
        "accuracy_bars": plot_accuracies(comparison),
        "tow_vs_rho": plot_tow_vs_param(comparison, "optimizer.rho"),
        "tow_vs_alpha": plot_tow_vs_param(comparison, "method.alpha"),
        "tow_vs_mask_fraction": plot_tow_vs_param(comparison, "method.mask_fraction"),
        "tow_vs_wall_seconds": plot_tow_vs_wall(comparison),
        "mia": plot_mia(comparison),
        "entanglement": plot_entanglement(comparison),
    }
    return {name: fig for name, fig in candidates.items() if fig is not None}


def figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# --------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f2f2f2; } td.text { text-align: left; }
figure { display: inline-block; margin: 0.5em; } img { max-width: 100%; }
.meta { color: #555; font-size: 0.9em; }
"""


def html_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            css = "" if isinstance(value, (int, float)) and not isinstance(value, bool) else ' class="text"'
            cells.append(f"<td{css}>{html.escape(fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(comparison: Comparison, summary: Sequence[Mapping[str, Any]], figures_png: Mapping[str, bytes],
                title: str, meta: Mapping[str, Any] | None = None) -> str:
    """One self-contained HTML page: summary, plots (base64 PNG), the full run table."""
    meta_lines = "".join(f"<div><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</div>"
                         for k, v in (meta or {}).items())
    columns, rows = summary_display(comparison, summary)
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name, png in figures_png.items())
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n<div class=\"meta\">{meta_lines}"
            f"<div><b>runs</b>: {len(comparison.rows)}</div></div>\n"
            f"<h2>Summary (mean ± 95 % CI over seeds)</h2>\n{html_table(columns, rows)}\n"
            f"<h2>Plots</h2>\n{images or '<p>No plottable metrics in these runs.</p>'}\n"
            f"<h2>Runs</h2>\n{html_table(comparison.columns, comparison.rows)}\n</body></html>\n")


# --------------------------------------------------------------------------- writing everything
@dataclass
class ReportFiles:
    out_dir: Path
    markdown: Path
    csv: Path
    parquet: Path
    summary_csv: Path
    summary_parquet: Path
    results: Path
    html: Path
    figures: dict[str, Path]

    def all(self) -> list[Path]:
        return [self.markdown, self.csv, self.parquet, self.summary_csv, self.summary_parquet, self.results,
                self.html, *self.figures.values()]


def write_report(comparison: Comparison, out_dir: str | os.PathLike, *, title: str = "sharp-unlearn comparison",
                 meta: Mapping[str, Any] | None = None, figures: bool = True) -> ReportFiles:
    """Write the table (Markdown, CSV, Parquet), the summary, the long results, PNGs and the HTML report."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from sharp_unlearn.results import write_results

    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    summary = summarize(comparison)
    table = _arrow_table(comparison.rows, comparison.columns)
    summary_columns = list(summary[0]) if summary else summary_keys(comparison)
    summary_table = _arrow_table(summary, summary_columns)
    files = ReportFiles(out, out / "comparison.md", out / "comparison.csv", out / "comparison.parquet",
                        out / "summary.csv", out / "summary.parquet", out / "results.parquet",
                        out / "report.html", {})
    pq.write_table(table, files.parquet)
    pacsv.write_csv(table, files.csv)
    pq.write_table(summary_table, files.summary_parquet)
    pacsv.write_csv(summary_table, files.summary_csv)
    write_results(long_rows(comparison), files.results)
    files.markdown.write_text(render_markdown(comparison, summary, title))
    pngs: dict[str, bytes] = {}
    if figures:
        for name, fig in build_figures(comparison).items():
            pngs[name] = figure_png(fig)
            path = out / "figures" / f"{name}.png"
            path.write_bytes(pngs[name])
            files.figures[name] = path
    files.html.write_text(render_html(comparison, summary, pngs, title, meta), encoding="utf-8")
    return files
