"""Run comparison: select MLflow runs, lay them side by side, summarise over seeds, plot.

The table has one row per run: who it is (run id, name, status and the
contract tags ``kind``, ``method``, ``optimizer``, ``dataset``, ``model``,
``forget_set``, ``seed``), the hyper-parameters that differ between the
selected runs (``optimizer.rho``, ``method.alpha``...), and the final
metrics exactly as MLflow holds them (``run.data.metrics``). The summary
groups runs by (kind, method, optimizer, dataset, forget_set) and reports the
mean and the 95 % confidence interval over seeds (Student t).

The report opens with pivots (``pivot``): one metric (ToW, MIA, entanglement,
test accuracy) as method x unlearning optimizer rows against pretraining
optimizer (x forget set) columns, mean ± 95 % CI over seeds.

Outputs (``write_report``): ``comparison.{md,csv,parquet}``,
``summary.{csv,parquet}``, ``pivot_<metric>.csv``, ``results.parquet`` (the
long format of ``sharp_unlearn.results``), ``figures/*.png`` and
``report.html``, which is self-contained: the plots are embedded as base64
PNG and the table sorting is an inline script, nothing is fetched.

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
from sharp_unlearn.markdown import fmt, markdown_table
from sharp_unlearn.results import rows_from_metrics, write_results
from sharp_unlearn.stats import mean_ci95
from sharp_unlearn.tracking import lineage

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
                "entanglement_wasserstein", "entanglement_variance_bounded", "entanglement_variance_classwise_weighted",
                "entanglement_variance_classwise_weighted_bounded", "entanglement_wasserstein_classwise_weighted",
                "sharpness_hessian", "sharpness_sam", "wall_seconds")
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


def render_markdown(comparison: Comparison, summary: Sequence[Mapping[str, Any]], title: str,
                    pivots: Sequence[Pivot] = ()) -> str:
    columns, rows = summary_display(comparison, summary)
    tables = "".join(f"## {p.heading}\n\nmean ± 95 % CI over seeds (n runs), best method per column in bold\n\n"
                     f"{markdown_table([*p.row_columns, *p.column_names], p.table_rows())}\n" for p in pivots)
    return (f"# {title}\n\n{tables}## Summary (mean ± 95 % CI over seeds)\n\n{markdown_table(columns, rows)}\n"
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
    out = []
    for row in comparison.rows:
        seed = row.get("seed")
        out += rows_from_metrics({m: row.get(m) for m in comparison.metric_columns}, run_id=row["run_id"],
                                 method=row.get("method") or row.get("kind") or "",
                                 optimizer=row.get("optimizer") or "", dataset=row.get("dataset") or "",
                                 forget_set=row.get("forget_set") or "",
                                 seed=seed if isinstance(seed, int) else -1)
    return out


# --------------------------------------------------------------------------- pivots (the tables people read)
#: (metric, heading, how the best cell of a column is chosen): "max" = highest, "retrain" = closest to the
#: retrained reference in the same column (what unlearning aims to match), None = no direction, nothing marked
PIVOT_METRICS = (
    ("tow", "ToW: tug of war against the retrained reference (higher is better)", "max"),
    ("mia_efficacy", "MIA efficacy on the forget set (closest to retrain is best)", "retrain"),
    ("entanglement_variance", "Retain / forget entanglement, variance (no better direction)", None),
    ("entanglement_wasserstein", "Retain / forget entanglement, Wasserstein (no better direction)", None),
    ("test_acc", "Test accuracy, % (higher is better)", "max"),
)
#: metrics in percent get two decimals, scores four
PERCENT_METRICS = ("forget_acc", "retain_acc", "test_acc", "val_acc", "train_acc")


@dataclass
class Pivot:
    """One metric laid out as method x unlearning optimizer rows, pretraining optimizer x forget set columns.

    ``cells[(row_key, column_key)]`` holds ``(mean, ci95 or None, n)``; ``best`` the cells marked best.
    """

    metric: str
    heading: str
    row_columns: list[str]
    rows: list[tuple]
    columns: list[tuple]
    column_names: list[str]
    cells: dict[tuple, tuple[float, float | None, int]]
    best: set[tuple]

    def cell_text(self, row: tuple, column: tuple, digits: int | None = None) -> str:
        found = self.cells.get((row, column))
        if found is None:
            return ""
        mean, ci, n = found
        digits = digits if digits is not None else (2 if self.metric in PERCENT_METRICS else 4)
        text = fmt(mean, digits) if ci is None else f"{fmt(mean, digits)} ± {fmt(ci, digits)}"
        return f"{text} (n={n})"

    def table_rows(self) -> list[dict[str, str]]:
        """Plain rows (row labels, then one text cell per column) for Markdown / CSV."""
        out = []
        for row in self.rows:
            record = dict(zip(self.row_columns, (str(v) for v in row), strict=True))
            for column, name in zip(self.columns, self.column_names, strict=True):
                text = self.cell_text(row, column)
                record[name] = f"**{text}**" if (row, column) in self.best and text else text
            out.append(record)
        return out


def _pivot_row_key(row: Mapping[str, Any], params: Sequence[str]) -> tuple | None:
    kind = row.get("kind")
    if kind in BASELINE_METHODS:  # the do-nothing model and the reference: one row each, any optimizer
        return (kind, "", *("" for _ in params))
    if kind != "unlearn":
        return None
    return (row.get("method") or "?", row.get("optimizer") or "?", *(fmt(row.get(p)) for p in params))


def pivot(comparison: Comparison, metric: str, heading: str | None = None, best: str | None = "max") -> Pivot | None:
    """The pivot of ``metric`` (mean ± 95 % CI over seeds, CI only when n > 1); None when no run has it.

    Rows: unlearning method x unlearning optimizer (plus the swept params that vary, so a cell only
    averages seeds), with the ``original`` and ``retrain`` baselines on top. Columns: the pretraining
    optimizer, and the forget set when there is more than one. ``best``: see PIVOT_METRICS; only
    method rows compete (the baselines are the yardsticks).
    """
    # a swept param splits a row only when it varies within one method x optimizer cell (methods that
    # merely carry different settings, as in the demo, keep one row each)
    cell_values: dict[tuple, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for row in comparison.rows:
        if row.get("kind") == "unlearn":
            cell = (row.get("method"), row.get("optimizer"), row.get("pretrain_optimizer"), row.get("forget_set"))
            for param in comparison.param_columns:
                cell_values[cell][param].add(fmt(row.get(param)))
    params = [p for p in comparison.param_columns if any(len(v[p]) > 1 for v in cell_values.values())]
    use_pre = any(r.get("pretrain_optimizer") for r in comparison.rows)
    forget_sets = {r.get("forget_set") for r in comparison.rows if _pivot_row_key(r, params) is not None}
    use_forget = len(forget_sets - {None}) > 1
    values: dict[tuple, list[float]] = defaultdict(list)
    for row in comparison.rows:
        key = _pivot_row_key(row, params)
        value = row.get(metric)
        if key is None or value is None or _isnan(value):
            continue
        column = ((row.get("pretrain_optimizer") or "?") if use_pre else "",
                  (row.get("forget_set") or "?") if use_forget else "")
        values[(key, column)].append(float(value))
    if not values:
        return None
    baseline_order = {name: i for i, name in enumerate(BASELINE_METHODS)}
    rows = sorted({k[0] for k in values}, key=lambda r: (r[0] not in baseline_order, baseline_order.get(r[0], 0),
                                                         tuple(str(v) for v in r)))
    columns = sorted({k[1] for k in values}, key=lambda c: tuple(str(v) for v in c))
    names = []
    for pre, forget in columns:
        parts = ([f"pretrained with {pre}"] if use_pre else []) + ([str(forget)] if use_forget else [])
        names.append(" · ".join(parts) or metric)
    cells = {}
    for key, members in values.items():
        mean, ci = mean_ci95(members)
        cells[key] = (mean, ci, len(members))
    marked: set[tuple] = set()
    for column in columns:
        contenders = [(r, cells[(r, column)][0]) for r in rows if (r, column) in cells and r[0] not in baseline_order]
        if not contenders or best is None:
            continue
        if best == "max":
            top = max(v for _, v in contenders)
            marked.update((r, column) for r, v in contenders if v == top)
        elif best == "retrain":
            target = next((cells[(r, column)][0] for r in rows if r[0] == "retrain" and (r, column) in cells), None)
            if target is not None:
                gap = min(abs(v - target) for _, v in contenders)
                marked.update((r, column) for r, v in contenders if abs(v - target) == gap)
    row_columns = ["method", "unlearning optimizer", *params]
    return Pivot(metric, heading or metric, row_columns, rows, columns, names, cells, marked)


def build_pivots(comparison: Comparison) -> list[Pivot]:
    """The pivots the data supports, ToW first."""
    found = [pivot(comparison, metric, heading, best) for metric, heading, best in PIVOT_METRICS]
    return [p for p in found if p is not None]


# --------------------------------------------------------------------------- plots
#: figures are at most this wide (inches at 100 dpi), so they fit a 1400 px window without shrinking text
FIGURE_WIDTH = 12.0
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
_LINESTYLES = ("-", "--", ":", "-.")


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


def _method_of(row: Mapping[str, Any]) -> str:
    kind = row.get("kind") or "?"
    return (row.get("method") or "?") if kind == "unlearn" else kind


class _Styles:
    """One colour per method (baselines in greys), one marker and line style per optimizer label."""

    def __init__(self, rows: Sequence[Mapping[str, Any]]):
        import matplotlib

        methods = sorted({_method_of(r) for r in rows if r.get("kind") == "unlearn"})
        cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
        self.colours = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
        self.colours.update({"original": "0.15", "retrain": "0.55", "pretrain": "0.35"})
        optimizers = sorted({_optimizer_label(r) for r in rows})
        self.optimizers = optimizers
        self.markers = {o: _MARKERS[i % len(_MARKERS)] for i, o in enumerate(optimizers)}
        self.lines = {o: _LINESTYLES[i % len(_LINESTYLES)] for i, o in enumerate(optimizers)}

    def colour(self, method: str):
        return self.colours.get(method, "0.4")

    def legend(self, fig, methods: Sequence[str], optimizers: Sequence[str], lines: bool = False) -> None:
        """Two compact legends outside the axes: colours (methods), then markers (optimizers)."""
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=self.colour(m), marker="s", linestyle="", markersize=8, label=m)
                   for m in methods]
        handles += [Line2D([], [], color="black", marker=self.markers[o], linestyle=self.lines[o] if lines else "",
                           label=o) for o in optimizers]
        if handles:
            fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)


def _figure(width: float = 7.0, height: float = 4.0):
    # Figure without pyplot: no global state, no GUI backend, safe in threads
    require("matplotlib", "analysis")
    from matplotlib.figure import Figure

    return Figure(figsize=(min(width, FIGURE_WIDTH), height), layout="constrained")


def _grouped(rows: Sequence[Mapping[str, Any]], metric: str, key) -> dict[Any, list[float]]:
    groups: dict[Any, list[float]] = defaultdict(list)
    for row in rows:
        value = row.get(metric)
        if value is not None and not _isnan(value):
            groups[key(row)].append(float(value))
    return groups


def _error_bars(ax, xs, ys, cis, *, horizontal: bool = False, **style) -> None:
    """Error bars only where there is a CI (n > 1): one seed draws no (zero-width) caps."""
    keep = [(x, y, c) for x, y, c in zip(xs, ys, cis, strict=True) if c is not None]
    if not keep:
        return
    a, b, c = zip(*keep, strict=True)
    if horizontal:
        ax.errorbar(b, a, xerr=c, fmt="none", ecolor="black", capsize=3, linewidth=1, **style)
    else:
        ax.errorbar(a, b, yerr=c, fmt="none", capsize=3, linewidth=1, **style)


def plot_tow_by_method(comparison: Comparison):
    """ToW per method, one panel per pretraining optimizer: a colour per method, a marker per unlearning optimizer.

    Mean ± 95 % CI over seeds (no bar for one seed); the do-nothing model is the dashed line.
    """
    rows = [r for r in comparison.rows if r.get("tow") is not None and r.get("kind") in ("unlearn", "original")]
    unlearned = [r for r in rows if r.get("kind") == "unlearn"]
    if not unlearned:
        return None
    styles = _Styles(unlearned)
    pretrainings = sorted({r.get("pretrain_optimizer") or "" for r in unlearned})
    methods = sorted({r.get("method") or "?" for r in unlearned})
    optimizers = sorted({r.get("optimizer") or "?" for r in unlearned})
    markers = {o: _MARKERS[i % len(_MARKERS)] for i, o in enumerate(optimizers)}
    groups = _grouped(unlearned, "tow", lambda r: (r.get("pretrain_optimizer") or "", r.get("method") or "?",
                                                  r.get("optimizer") or "?"))
    if not groups:  # every ToW is NaN
        return None
    originals = _grouped([r for r in rows if r.get("kind") == "original"], "tow",
                         lambda r: r.get("pretrain_optimizer") or r.get("optimizer") or "")
    width = min(FIGURE_WIDTH, max(6.0, (0.55 * len(methods) + 1.0) * len(pretrainings) + 2.0))
    fig = _figure(width, 4.5)
    axes = fig.subplots(1, len(pretrainings), sharey=True, squeeze=False)[0]
    step = 0.6 / max(1, len(optimizers))
    extent = [v for vs in originals.values() for v in vs]  # what the y axis must show, CI whiskers included
    for ax, pre in zip(axes, pretrainings, strict=True):
        for j, opt in enumerate(optimizers):
            for i, method in enumerate(methods):
                values = groups.get((pre, method, opt))
                if not values:
                    continue
                mean, ci = mean_ci95(values)
                x = i - 0.3 + step * (j + 0.5)
                ax.plot([x], [mean], marker=markers[opt], color=styles.colour(method), linestyle="", markersize=7)
                extent += [mean - (ci or 0.0), mean + (ci or 0.0)]
                _error_bars(ax, [x], [mean], [ci], ecolor=styles.colour(method))
        if originals.get(pre):
            ax.axhline(mean_ci95(originals[pre])[0], color="0.3", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right")
        ax.set_title(f"pretrained with {pre}" if pre else "all runs", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("ToW (higher is better)")
    axes[0].set_ylim(max(0.0, min(extent) - 0.03), max(extent) + 0.03)
    fig.suptitle("ToW by method (mean ± 95 % CI where n > 1" + ("; dashed: the original model" if originals else "")
                 + ")")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="black", marker=markers[o], linestyle="", label=f"unlearn with {o}")
               for o in optimizers]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    return fig


def _hbars(comparison: Comparison, metrics: Sequence[str], title: str, xlabel: str, xlim=None,
           short=lambda m: m):
    """One panel per metric, one horizontal bar per method-optimizer group: long labels stay readable."""
    metrics = [m for m in metrics if any(r.get(m) is not None for r in comparison.rows)]
    if not metrics:
        return None
    rows = [r for r in comparison.rows if any(r.get(m) is not None for m in metrics) and r.get("kind") != "pretrain"]
    if not rows:
        return None
    styles = _Styles(rows)
    order = {name: i for i, name in enumerate(BASELINE_METHODS)}
    labels = sorted({_group_label(r) for r in rows},
                    key=lambda s: (s.split(" / ")[0] not in order, order.get(s.split(" / ")[0], 0), s))
    method_of = {_group_label(r): _method_of(r) for r in rows}
    fig = _figure(FIGURE_WIDTH if len(metrics) > 1 else 8.0, max(2.5, 0.26 * len(labels) + 1.4))
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    ys = range(len(labels))
    for ax, metric in zip(axes, metrics, strict=True):
        groups = _grouped(rows, metric, _group_label)
        stats = [mean_ci95(groups[label]) if groups.get(label) else (float("nan"), None) for label in labels]
        ax.barh(list(ys), [s[0] for s in stats], color=[styles.colour(method_of[label]) for label in labels],
                height=0.7)
        _error_bars(ax, list(ys), [s[0] for s in stats], [s[1] for s in stats], horizontal=True)
        ax.set_title(short(metric), fontsize=10)
        ax.set_xlabel(xlabel)
        if xlim:
            ax.set_xlim(*xlim)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(list(ys), labels, fontsize=8)
    axes[0].invert_yaxis()  # baselines on top, as in the tables
    fig.suptitle(title)
    return fig


def plot_accuracies(comparison: Comparison):
    """Forget / retain / test accuracy per method-optimizer group (baselines on top)."""
    if not any(r.get("forget_acc") is not None or r.get("retain_acc") is not None for r in comparison.rows):
        return None
    return _hbars(comparison, ("forget_acc", "retain_acc", "test_acc"), "Accuracy on the forget, retain and test sets",
                  "accuracy (%)", (0, 105), short=lambda m: m.replace("_acc", ""))


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
            points.append((row, float(x), float(row["tow"])))
    if len({p[1] for p in points}) < 2:
        return None
    styles = _Styles([p[0] for p in points])
    series = sorted({(_method_of(p[0]), _optimizer_label(p[0])) for p in points})
    fig = _figure(9.0, 4.5)
    ax = fig.add_subplot()
    for method, opt in series:
        by_x: dict[float, list[float]] = defaultdict(list)
        for row, x, y in points:
            if (_method_of(row), _optimizer_label(row)) == (method, opt):
                by_x[x].append(y)
        xs = sorted(by_x)
        stats = [mean_ci95(by_x[x]) for x in xs]
        ax.plot(xs, [s[0] for s in stats], marker=styles.markers[opt], linestyle=styles.lines[opt],
                color=styles.colour(method))
        _error_bars(ax, xs, [s[0] for s in stats], [s[1] for s in stats], ecolor=styles.colour(method))
    ax.set_xlabel(param)
    ax.set_ylabel("ToW")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(f"ToW against {param}")
    styles.legend(fig, sorted({m for m, _ in series}), sorted({o for _, o in series}), lines=True)
    return fig


def plot_mia(comparison: Comparison):
    return _hbars(comparison, ("mia_efficacy", "mia_auc", "mia_tpr_at_1fpr"), "Membership inference (SVC-MIA)",
                  "score")


def plot_entanglement(comparison: Comparison):
    return _hbars(comparison, ("entanglement_variance", "entanglement_wasserstein"),
                  "Retain / forget entanglement", "score")


def plot_tow_vs_wall(comparison: Comparison):
    """ToW against wall time: unlearning exists to be cheaper than retraining."""
    rows = [r for r in comparison.rows if r.get("tow") is not None and r.get("wall_seconds") is not None]
    if not rows:
        return None
    styles = _Styles(rows)
    fig = _figure(9.0, 4.5)
    ax = fig.add_subplot()
    for row in rows:
        ax.plot([row["wall_seconds"]], [row["tow"]], marker=styles.markers[_optimizer_label(row)], linestyle="",
                color=styles.colour(_method_of(row)), alpha=0.85)
    retrain_seconds = sorted({r["wall_seconds"] for r in comparison.rows
                              if r.get("kind") == "retrain" and r.get("wall_seconds") is not None})
    for seconds in retrain_seconds:  # the cost unlearning is meant to undercut
        ax.axvline(seconds, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("wall seconds" + (" (dashed: retraining)" if retrain_seconds else ""))
    ax.set_ylabel("ToW")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("ToW against wall time")
    styles.legend(fig, sorted({_method_of(r) for r in rows}), sorted({_optimizer_label(r) for r in rows}))
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
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; max-width: 1400px; }
.scroll { overflow-x: auto; max-width: 100%; margin-bottom: 1.5em; }
.scroll.tall { max-height: 70vh; overflow-y: auto; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; position: sticky; top: 0; } td.text, th.text { text-align: left; }
td.best { font-weight: bold; background: #e3f4e3; }
table.sortable th { cursor: pointer; } table.sortable th:hover { background: #e4e4e4; }
figure { margin: 0.5em 0 1.5em 0; } img { max-width: 100%; height: auto; }
figcaption, .meta, .note { color: #555; font-size: 0.9em; }
details { margin-bottom: 1em; } summary { cursor: pointer; font-weight: bold; }
"""

#: click a header to sort by it (again to reverse); numbers sort as numbers, blanks last; no libraries
_SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, index) {
    th.title = "click to sort";
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var up = th.getAttribute("data-sort") !== "up";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-sort"); });
      th.setAttribute("data-sort", up ? "up" : "down");
      function key(row) {  // "0.9123", "1e-05" and "0.91 ± 0.02" are numbers; run ids stay text
        var text = row.cells[index].textContent.trim();
        if (text === "") { return null; }
        return /^-?[0-9.]+(e[-+]?[0-9]+)?( ±.*)?$/.test(text) ? parseFloat(text) : text;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) { return (x === null) - (y === null); }
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def html_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], css_class: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            css = "" if isinstance(value, (int, float)) and not isinstance(value, bool) else ' class="text"'
            cells.append(f"<td{css}>{html.escape(fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    attr = f' class="{css_class}"' if css_class else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def pivot_html(table: Pivot) -> str:
    head = "".join([*(f'<th class="text">{html.escape(c)}</th>' for c in table.row_columns),
                    *(f"<th>{html.escape(c)}</th>" for c in table.column_names)])
    body = []
    for row in table.rows:
        cells = [f'<td class="text">{html.escape(str(v))}</td>' for v in row]
        for column in table.columns:
            css = ' class="best"' if (row, column) in table.best else ""
            cells.append(f"<td{css}>{html.escape(table.cell_text(row, column))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<h3>{html.escape(table.heading)}</h3>\n<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>\n')


def run_counts(comparison: Comparison) -> tuple[int, int]:
    """(selected runs, baseline rows added from their result tables): the title and header say the same."""
    baselines = sum(1 for r in comparison.rows if r.get("status") == "baseline")
    return len(comparison.rows) - baselines, baselines


def render_html(comparison: Comparison, summary: Sequence[Mapping[str, Any]], figures_png: Mapping[str, bytes],
                title: str, meta: Mapping[str, Any] | None = None) -> str:
    """One self-contained HTML page: pivots, plots (base64 PNG), then the summary and run tables folded away."""
    meta_lines = "".join(f"<div><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</div>"
                         for k, v in (meta or {}).items())
    selected, baselines = run_counts(comparison)
    counted = f"{selected} runs" + (f" + {baselines} baseline rows (original, retrain) from their result tables"
                                    if baselines else "")
    columns, rows = summary_display(comparison, summary)
    pivots = "".join(pivot_html(p) for p in build_pivots(comparison))
    if pivots:
        pivots = ('<h2>Results by method and optimizer</h2>\n<p class="note">mean ± 95 % CI over seeds '
                  "(Student t; no CI for one seed), n = runs per cell; best method per column in bold.</p>\n"
                  + pivots)
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name, png in figures_png.items())
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n<div class=\"meta\">{meta_lines}"
            f"<div><b>runs</b>: {html.escape(counted)}</div></div>\n{pivots}"
            f"<h2>Plots</h2>\n{images or '<p>No plottable metrics in these runs.</p>'}\n"
            f"<details><summary>Summary per group, every metric (mean ± 95 % CI over seeds, {len(rows)} groups)"
            f"</summary>\n<div class=\"scroll tall\">{html_table(columns, rows, 'sortable')}</div></details>\n"
            f"<details><summary>All rows ({len(comparison.rows)}: {html.escape(counted)}); click a header to sort"
            f"</summary>\n<div class=\"scroll tall\">{html_table(comparison.columns, comparison.rows, 'sortable')}"
            f"</div></details>\n<script>{_SORT_JS}</script>\n</body></html>\n")


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
    #: ``pivot_<metric>.csv``: the tables the report opens with, by metric
    pivots: dict[str, Path] = field(default_factory=dict)

    def all(self) -> list[Path]:
        return [self.markdown, self.csv, self.parquet, self.summary_csv, self.summary_parquet, self.results,
                self.html, *self.pivots.values(), *self.figures.values()]


def write_report(comparison: Comparison, out_dir: str | os.PathLike, *, title: str = "sharp-unlearn comparison",
                 meta: Mapping[str, Any] | None = None, figures: bool = True) -> ReportFiles:
    """Write the table (Markdown, CSV, Parquet), the summary, the long results, PNGs and the HTML report."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

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
    pivots = build_pivots(comparison)
    for table in pivots:
        files.pivots[table.metric] = out / f"pivot_{table.metric}.csv"
        rows = [{k: v.replace("**", "") for k, v in row.items()} for row in table.table_rows()]
        pacsv.write_csv(_arrow_table(rows, [*table.row_columns, *table.column_names]), files.pivots[table.metric])
    files.markdown.write_text(render_markdown(comparison, summary, title, pivots))
    pngs: dict[str, bytes] = {}
    if figures:
        for name, fig in build_figures(comparison).items():
            pngs[name] = figure_png(fig)
            path = out / "figures" / f"{name}.png"
            path.write_bytes(pngs[name])
            files.figures[name] = path
    files.html.write_text(render_html(comparison, summary, pngs, title, meta), encoding="utf-8")
    return files
