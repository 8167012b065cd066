"""The empirical table: methods x pretrain {SGD, SAM} x unlearn {SGD, SAM}, plus Sharp MinMax,
on low / mid / high memorization forget sets, over several seeds.

Per seed: memorization scores from the held-out estimator (K subset models,
cached and resumable), then the grid of :mod:`sharp_unlearn.recipes.grid`
with the forget set at each level, MIA and entanglement for every run. The
report gives ToW as mean ± 95 % CI over seeds, states for every cell where
SAM does not beat SGD, and the wall time of the best method against
retraining. Outputs: ``table.parquet`` (long format), ``summary.parquet``,
``report.md``, ``report.html`` (self-contained), all logged to MLflow in one
``kind=reproduce`` parent run whose children are every stage's own tracked run.
"""
from __future__ import annotations

import base64
import copy
import html
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sharp_unlearn.config import config_from_dict, merge
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.metrics.tow import mean_ci95
from sharp_unlearn.progress import stage
from sharp_unlearn.recipes.grid import load_spec, model_evaluator, run_grid, write_long

DEFAULT_SPEC = "reproduce_digits"
CIFAR_SPEC = "reproduce_cifar"
SUMMARY_METRICS = ("tow", "forget_acc", "retain_acc", "test_acc", "mia_efficacy", "mia_auc",
                   "entanglement_variance", "entanglement_wasserstein", "wall_seconds")


def memorization_scores(spec: dict[str, Any], seed: int, output_dir: str, tracking: dict, quiet: bool) -> str:
    """Held-out memorization scores for this seed's training set (cached per training hash)."""
    from sharp_unlearn.data.memorization import compute_memorization
    from sharp_unlearn.data.memorization_heldout import HeldoutSettings

    mem = dict(spec.get("memorization") or {})
    tree = merge(spec["base"], {"seed": seed, "output_dir": output_dir, "tracking": tracking})
    tree = merge(tree, mem.pop("config", {}) or {})
    cfg = config_from_dict(tree)
    settings = HeldoutSettings(**mem)
    result = compute_memorization(cfg, settings, quiet=quiet)
    return str(result.scores_path)


def summarize(rows: Sequence[dict[str, Any]], evaluation: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and 95 % CI half-width over seeds per (level, pretrain, method, unlearn_opt)."""
    keys = ("level", "pretrain", "method", "unlearn_opt")
    merged: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    extra = {tuple(e[k] for k in keys) + (e["seed"],): e for e in evaluation}
    for row in rows:
        key = tuple(row[k] for k in keys)
        values = {**row, **{k: v for k, v in extra.get(key + (row["seed"],), {}).items() if k not in keys}}
        for metric in SUMMARY_METRICS:
            value = values.get(metric)
            if isinstance(value, (int, float)) and value == value:
                merged[key][metric].append(float(value))
    out = []
    for key, metrics in merged.items():
        entry: dict[str, Any] = dict(zip(keys, key, strict=True))
        for metric, values in metrics.items():
            mean, half = mean_ci95(values)
            entry[metric] = mean
            entry[f"{metric}_ci95"] = half
            entry["seeds"] = max(entry.get("seeds", 0), len(values))
        out.append(entry)
    order = {"low": 0, "mid": 1, "high": 2, "mix": 3}
    first = {"original": 0, "retrain": 1}  # the baselines head each block
    return sorted(out, key=lambda e: (order.get(e["level"], 9), e["pretrain"], first.get(e["method"], 2),
                                      e["method"], e["unlearn_opt"]))


def sam_vs_sgd(summary: Sequence[dict[str, Any]]) -> list[str]:
    """Plain statements, per level and method: does SAM (pretrain or unlearn) beat SGD on ToW?"""
    lines = []
    cells = {(s["level"], s["pretrain"], s["method"], s["unlearn_opt"]): s for s in summary}
    for (level, pretrain, method, unlearn), s in sorted(cells.items()):
        if unlearn == "sam" and (level, pretrain, method, "sgd") in cells:
            sgd = cells[(level, pretrain, method, "sgd")]
            verdict = "beats" if s["tow"] > sgd["tow"] else "does NOT beat"
            lines.append(f"{level}: {method}, pretrain {pretrain}: unlearning with SAM {verdict} SGD "
                         f"(ToW {s['tow']:.3f} vs {sgd['tow']:.3f})")
        if pretrain == "sam" and method not in ("original", "retrain") and (level, "sgd", method, unlearn) in cells:
            sgd = cells[(level, "sgd", method, unlearn)]
            verdict = "beats" if s["tow"] > sgd["tow"] else "does NOT beat"
            lines.append(f"{level}: {method}/{unlearn}: SAM pretraining {verdict} SGD pretraining "
                         f"(ToW {s['tow']:.3f} vs {sgd['tow']:.3f})")
    return lines


def best_speedup(summary: Sequence[dict[str, Any]], tow_floor: float = 0.9) -> dict[str, Any] | None:
    """The cheapest unlearning run reaching ``tow_floor``, against the retrain wall time of its cell.

    Cells where doing nothing already reaches the floor (e.g. low-memorization forget sets, which
    the reference classifies as well as the original does) say nothing about unlearning: skipped.
    """
    retrain = {(s["level"], s["pretrain"]): s["wall_seconds"] for s in summary if s["method"] == "retrain"}
    trivial = {(s["level"], s["pretrain"]) for s in summary
               if s["method"] == "original" and s.get("tow", 0.0) >= tow_floor}
    best = None
    for s in summary:
        if s["method"] in ("original", "retrain") or s.get("tow", 0.0) < tow_floor:
            continue
        if (s["level"], s["pretrain"]) in trivial:
            continue
        ref = retrain.get((s["level"], s["pretrain"]))
        if not ref or not s.get("wall_seconds"):
            continue
        ratio = ref / s["wall_seconds"]
        if best is None or ratio > best["speedup"]:
            best = {**{k: s[k] for k in ("level", "pretrain", "method", "unlearn_opt", "tow", "wall_seconds")},
                    "retrain_seconds": ref, "speedup": ratio}
    return best


def _fmt(mean: float | None, half: float | None) -> str:
    if mean is None:
        return ""
    if half is None or half != half:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {half:.3f}"


def render_markdown(summary, statements, speed, spec_name: str, seeds: Sequence[int]) -> str:
    lines = [f"# Reproduction table ({spec_name}, seeds {', '.join(map(str, seeds))})", "",
             "ToW against the retrained reference, mean ± 95 % CI over seeds (1 = indistinguishable from "
             "retraining). `original` is the untouched model; `retrain` the reference itself.", ""]
    levels = list(dict.fromkeys(s["level"] for s in summary))
    for level in levels:
        lines += [f"## Forget set: memorization {level}", "",
                  "| pretrain | method | unlearn | ToW | forget acc | retain acc | test acc | MIA efficacy | "
                  "entangl. (var) | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for s in summary:
            if s["level"] != level:
                continue
            lines.append("| " + " | ".join([
                s["pretrain"], s["method"], s["unlearn_opt"], _fmt(s.get("tow"), s.get("tow_ci95")),
                _fmt(s.get("forget_acc"), s.get("forget_acc_ci95")),
                _fmt(s.get("retain_acc"), s.get("retain_acc_ci95")),
                _fmt(s.get("test_acc"), s.get("test_acc_ci95")),
                _fmt(s.get("mia_efficacy"), s.get("mia_efficacy_ci95")),
                _fmt(s.get("entanglement_variance"), s.get("entanglement_variance_ci95")),
                f"{s.get('wall_seconds', float('nan')):.2f}"]) + " |")
        lines.append("")
    lines += ["## SAM against SGD, cell by cell", ""] + [f"- {line}" for line in statements] + [""]
    lines += ["## Cost against retraining", ""]
    if speed is None:
        lines.append("- No unlearning run reached ToW >= 0.9 where doing nothing does not: no speed-up to report.")
    else:
        lines.append(f"- Cheapest run with ToW >= 0.9 (in a cell where doing nothing stays below): "
                     f"{speed['method']} ({speed['unlearn_opt']}, pretrain {speed['pretrain']}, {speed['level']}): "
                     f"ToW {speed['tow']:.3f} in {speed['wall_seconds']:.2f} s "
                     f"vs retraining {speed['retrain_seconds']:.2f} s: **{speed['speedup']:.1f}x** cheaper.")
    return "\n".join(lines) + "\n"


def plot_summary(summary) -> dict[str, bytes]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    from sharp_unlearn.report import figure_png

    figures = {}
    for level in dict.fromkeys(s["level"] for s in summary):
        cells = [s for s in summary if s["level"] == level and s["method"] not in ("original", "retrain")]
        if not cells:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cells)), 4))
        labels = [f"{s['method']}\n{s['pretrain']}/{s['unlearn_opt']}" for s in cells]
        means = [s.get("tow", float("nan")) for s in cells]
        errors = [0 if s.get("tow_ci95") != s.get("tow_ci95") else s.get("tow_ci95", 0) for s in cells]
        colors = ["tab:orange" if "sam" in s["unlearn_opt"] else "tab:blue" for s in cells]
        ax.bar(range(len(cells)), means, yerr=errors, color=colors, capsize=2)
        ax.set_xticks(range(len(cells)), labels, rotation=90, fontsize=7)
        ax.set_ylabel("ToW (mean ± 95% CI)")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"memorization {level}: blue = SGD unlearning, orange = SAM")
        fig.tight_layout()
        figures[f"tow_{level}"] = figure_png(fig)
        plt.close(fig)
    return figures


def render_html(markdown_text: str, summary, figures: dict[str, bytes], title: str) -> str:
    from sharp_unlearn.report import html_table

    columns = ["level", "pretrain", "method", "unlearn_opt", "seeds"] + [
        c for m in SUMMARY_METRICS for c in (m, f"{m}_ci95")]
    images = "".join(f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,'
                     f'{base64.b64encode(png).decode("ascii")}"><figcaption>{html.escape(n)}</figcaption></figure>'
                     for n, png in figures.items())
    statements = "".join(f"<li>{html.escape(line[2:])}</li>" for line in markdown_text.splitlines()
                         if line.startswith("- "))
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse;font-size:.8em}"
            "th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><h2>Findings</h2><ul>{statements}</ul><h2>Plots</h2>{images}"
            f"<h2>Summary (mean and 95 % CI over seeds)</h2>{html_table(columns, summary)}</body></html>\n")


def run_table(*, output_dir: str = "runs/reproduce-table", seeds: Sequence[int] | None = None,
              tracking: dict | None = None, root: str | None = None, dataset: str | None = None,
              sweep: bool = False, methods: Sequence[str] | None = None, overrides: Sequence[str] = (),
              quiet: bool = True, spec_path: str | None = None) -> dict[str, Any]:
    from sharp_unlearn.recipes.demo import log_grid_summary, parent_run
    from sharp_unlearn.results import write_results
    from sharp_unlearn.tracking import check_tracking

    tracking = dict(tracking or {})
    spec_name = spec_path or (CIFAR_SPEC if root else DEFAULT_SPEC)
    extra = list(overrides)
    if root:
        if dataset not in ("cifar10", "cifar100"):
            raise ConfigError(f"--dataset={dataset!r} is not valid with --root; expected cifar10 or cifar100")
        extra = [f"base.data.root={root}", f"base.data.name={dataset}"] + extra
    spec = load_spec(spec_path or spec_name, spec_name, extra)
    seeds = list(seeds or spec.get("seeds") or [0, 1, 2])
    out = Path(output_dir)
    base_cfg = config_from_dict(merge(spec["base"], {"output_dir": output_dir, "tracking": tracking}))
    check_tracking(base_cfg)
    all_rows: list[dict[str, Any]] = []
    all_long: list[dict[str, Any]] = []
    all_eval: list[dict[str, Any]] = []
    evaluator = model_evaluator(spec.get("evaluate") or ["mia", "entanglement"], out / "evaluation")
    # one parent run: every stage (scores, sweeps, pretraining, references, unlearning) is its child
    with parent_run(spec, output_dir, tracking, "reproduce", "reproduce-table") as tracker:
        tracker.set_tags({"reproduce": "table"})
        for number, seed in enumerate(seeds, 1):
            # the grid counts its own stages within a seed; this line says which seed that is
            stage(number, len(seeds), f"seed {seed} (scores, then the grid)", quiet)
            seed_spec = copy.deepcopy(spec)
            if seed_spec["forget"].get("kind") == "memorization" and seed_spec["forget"].get("scores") == "heldout":
                seed_spec["forget"]["scores"] = memorization_scores(spec, seed, output_dir, tracking, quiet)
            if sweep:
                seed_spec = tune_methods(seed_spec, seed, output_dir, tracking, quiet)
            grid = run_grid(seed_spec, output_dir=output_dir, tracking=tracking, methods=methods, seeds=[seed],
                            quiet=quiet, evaluator=evaluator)
            all_rows += grid.rows
            all_long += grid.long_rows
            all_eval += grid.evaluation
        summary = summarize(all_rows, all_eval)
        statements = sam_vs_sgd(summary)
        speed = best_speedup(summary)
        markdown = render_markdown(summary, statements, speed, spec_name, seeds)
        out.mkdir(parents=True, exist_ok=True)
        table_path = write_long(all_long, out / "table.parquet")
        import pyarrow as pa
        import pyarrow.parquet as pq

        summary_path = out / "summary.parquet"
        pq.write_table(pa.Table.from_pylist(summary), summary_path)
        eval_rows = [{"run_id": "", "method": e["method"], "optimizer": e["unlearn_opt"], "dataset": base_cfg.data.name,
                      "forget_set": e["level"], "seed": e["seed"], "split": "forget", "metric": k, "value": float(v)}
                     for e in all_eval for k, v in e.items()
                     if k not in ("seed", "pretrain", "level", "method", "unlearn_opt") and isinstance(v, (int, float))]
        eval_path = write_results(eval_rows, out / "evaluation.parquet")
        md_path = out / "report.md"
        md_path.write_text(markdown)
        html_path = out / "report.html"
        html_path.write_text(render_html(markdown, summary, plot_summary(summary),
                                         f"sharp-unlearn reproduction ({spec_name})"))
        if speed is not None:
            tracker.log_metrics({"best_speedup_vs_retrain": speed["speedup"], "best_tow": speed["tow"]})
        for path in (table_path, summary_path, eval_path, md_path, html_path):
            tracker.log_artifact(path, "report")
        log_grid_summary(tracker, all_rows, all_eval, "reproduce")
    return {"report_md": str(md_path), "report_html": str(html_path), "table": str(table_path),
            "summary": str(summary_path), "speedup": speed, "sam_vs_sgd": statements}


#: what ``--sweep`` searches per method (the learning rate always; the method's own weights where it has them)
SWEEP_SPACE: dict[str, dict[str, Any]] = {
    "neggrad": {"method.alpha": {"uniform": [0.9, 0.999]}},
    "sharp_minmax": {"method.alpha": {"uniform": [0.9, 0.999]}, "method.mask_fraction": {"uniform": [0.2, 0.8]},
                     "method.rho_max": {"loguniform": [0.01, 0.2]}},
    "salun": {"method.mask_fraction": {"uniform": [0.2, 0.8]}},
    "l1_sparse": {"method.l1_weight": {"loguniform": [1e-5, 1e-3]}},
    "scrub": {"method.temperature": {"choice": [2.0, 4.0]}},
}


def tune_methods(spec: dict[str, Any], seed: int, output_dir: str, tracking: dict, quiet: bool,
                 num_samples: int = 6) -> dict[str, Any]:
    """``--sweep``: tune every (method, unlearn optimizer) cell with Ray Tune on the first level's forget
    set (ToW, ASHA), then run the grid with each cell's best settings.

    The tuned settings are recorded in the returned spec (``methods.<name>.per_optimizer``) and the
    sweeps are MLflow parent runs of their own, so a reader can see what was searched.
    """
    from sharp_unlearn.tune import parse_sweep, run_sweep

    tuned = copy.deepcopy(spec)
    level = (spec.get("levels") or [spec["forget"].get("level", "high")])[-1]
    methods = dict(spec.get("methods") or {})
    per_cell: dict[str, dict[str, Any]] = {}
    for method_name, over in methods.items():
        over = dict(over or {})
        optimizers = over.pop("optimizers", None) or spec["unlearn_optimizers"]
        optimizer_over = dict(over.pop("optimizer", None) or {})
        for opt in optimizers:
            search = {"optimizer.lr": {"loguniform": [0.002, 0.1]}, **SWEEP_SPACE.get(method_name, {})}
            raw = {"name": f"reproduce-{method_name}-{opt}-s{seed}", "stage": "unlearn",
                   "base": merge(spec["base"], {"seed": seed}),
                   "forget": merge(spec["forget"], {"level": level}),
                   "unlearn": merge(spec.get("unlearn", {}), {"optimizer": {**optimizer_over, "name": opt}}),
                   "method": {"name": method_name, **over},
                   "search": search, "objective": {"metric": "tow", "mode": "max"},
                   "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
                   "searcher": {"name": "random", "seed": seed}, "num_samples": num_samples,
                   "resources": {"cpu": 1}, "output_dir": output_dir}
            sweep = parse_sweep(raw, tracking=tracking)
            try:
                outcome = run_sweep(sweep, resume=False, quiet=quiet)
            except ConfigError as exc:
                if "already exists" not in str(exc):
                    raise
                outcome = run_sweep(sweep, resume=True, quiet=quiet)  # a finished sweep: reuse its trials
            if outcome.best is None:
                continue
            best = {key: outcome.best[key] for key in search if key in outcome.best}
            per_cell[f"{method_name}/{opt}"] = best
    tuned["tuned"] = per_cell
    return apply_tuned(tuned)


def apply_tuned(spec: dict[str, Any]) -> dict[str, Any]:
    """Fold ``spec["tuned"]`` (``{"method/opt": {"optimizer.lr": .., "method.alpha": ..}}``) into per-method,
    per-optimizer entries the grid understands (one method entry per tuned optimizer)."""
    tuned = spec.pop("tuned", {}) or {}
    methods = dict(spec.get("methods") or {})
    out: dict[str, Any] = {}
    for method_name, over in methods.items():
        over = dict(over or {})
        optimizers = over.pop("optimizers", None) or spec["unlearn_optimizers"]
        for opt in optimizers:
            cell = copy.deepcopy(over)
            cell["optimizers"] = [opt]
            for key, value in tuned.get(f"{method_name}/{opt}", {}).items():
                section, field_name = key.split(".", 1)
                if section == "optimizer":
                    cell.setdefault("optimizer", {})[field_name] = value
                else:
                    cell[field_name] = value
            out[method_name if len(optimizers) == 1 else f"{method_name}@{opt}"] = cell
    spec["methods"] = out
    return spec
