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

from sharp_unlearn.config import load_yaml, merge
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.progress import stage
from sharp_unlearn.ray_cluster import ray_session
from sharp_unlearn.recipes.demo import log_grid_summary, parent_run
from sharp_unlearn.recipes.grid import load_spec, method_of, model_evaluator, run_grid, select_methods, write_long
from sharp_unlearn.report import figure_png, html_table
from sharp_unlearn.reproduce.memorization_scores import memorization_scores
from sharp_unlearn.reproduce.paper_code import PRESET, paper_code_entry, unlearn_train
from sharp_unlearn.results import write_results
from sharp_unlearn.stats import fmt_mean_ci, is_significant, mean_ci95
from sharp_unlearn.tracking import check_tracking
from sharp_unlearn.tuning import parse_sweep, run_sweep
from sharp_unlearn.validation import config_from_dict

DEFAULT_SPEC = "reproduce_digits"
CIFAR_SPEC = "reproduce_cifar"
SUMMARY_METRICS = ("tow", "forget_acc", "retain_acc", "test_acc", "mia_efficacy", "mia_auc",
                   "entanglement_variance", "entanglement_wasserstein", "wall_seconds")


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


def _signed(mean: float, half: float | None) -> str:
    """A paired difference: ``+0.123 ± 0.045``, or ``+0.123`` when there is no interval (one seed)."""
    return f"{mean:+.3f}" if half is None else f"{mean:+.3f} ± {half:.3f}"


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
                s["pretrain"], s["method"], s["unlearn_opt"], fmt_mean_ci(s.get("tow"), s.get("tow_ci95")),
                fmt_mean_ci(s.get("forget_acc"), s.get("forget_acc_ci95")),
                fmt_mean_ci(s.get("retain_acc"), s.get("retain_acc_ci95")),
                fmt_mean_ci(s.get("test_acc"), s.get("test_acc_ci95")),
                fmt_mean_ci(s.get("mia_efficacy"), s.get("mia_efficacy_ci95")),
                fmt_mean_ci(s.get("entanglement_variance"), s.get("entanglement_variance_ci95")),
                fmt_mean_ci(s.get("wall_seconds"), None, 2)]) + " |")
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
    figures = {}
    for level in dict.fromkeys(s["level"] for s in summary):
        cells = [s for s in summary if s["level"] == level and s["method"] not in ("original", "retrain")]
        if not cells:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cells)), 4))
        labels = [f"{s['method']}\n{s['pretrain']}/{s['unlearn_opt']}" for s in cells]
        means = [s.get("tow", float("nan")) for s in cells]
        errors = [0.0 if s.get("tow_ci95") is None or s["tow_ci95"] != s["tow_ci95"] else s["tow_ci95"]
                  for s in cells]
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
              quiet: bool = True, spec_path: str | None = None, trials: int | None = None,
              epochs: int | None = None, preset: str | None = None) -> dict[str, Any]:
    """The table; with ``sweep`` every method x optimizer cell (and the paper-code Sharp MinMax, from
    ``preset``) is tuned first with ``trials`` Ray Tune trials on the first seed, and every seed's grid
    runs each cell's best settings; ``epochs`` fixes every method's unlearning epochs."""
    tracking = dict(tracking or {})
    spec_name = spec_path or (CIFAR_SPEC if root else DEFAULT_SPEC)
    extra = list(overrides)
    if root:
        if dataset not in ("cifar10", "cifar100"):
            raise ConfigError(f"--dataset={dataset!r} is not valid with --root; expected cifar10 or cifar100")
        extra = [f"base.data.root={root}", f"base.data.name={dataset}"] + extra
    spec = load_spec(spec_path or spec_name, spec_name, extra)
    seeds = list(seeds or spec.get("seeds") or [0, 1, 2])
    if not sweep and (trials is not None or epochs is not None or preset is not None):
        raise ConfigError("--trials, --epochs and a paper-code preset are budget settings of --sweep; "
                          "expected them together with --sweep")
    if sweep:
        trials = DEFAULT_TRIALS if trials is None else trials
        if methods:  # only the asked methods are tuned (select_methods checks their names)
            spec["methods"] = {e: o for e, o in select_methods(spec, methods).items() if method_of(e) in methods}
        spec = with_paper_code(spec, preset or PRESET)
        if epochs is not None:
            spec = fix_epochs(spec, epochs)
    tuned: dict[str, dict[str, Any]] | None = None
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
                if tuned is None:  # tuned once, on the first seed; every seed runs the same settings
                    tuned = tune_methods(seed_spec, seed, output_dir, tracking, quiet, num_samples=trials)
                seed_spec["tuned"] = {cell: found["params"] for cell, found in tuned.items()}
                seed_spec = apply_tuned(seed_spec)
            grid = run_grid(seed_spec, output_dir=output_dir, tracking=tracking, methods=methods, seeds=[seed],
                            quiet=quiet, evaluator=evaluator)
            relabel_paper_code(grid)
            all_rows += grid.rows
            all_long += grid.long_rows
            all_eval += grid.evaluation
        summary = summarize(all_rows, all_eval)
        statements = sam_vs_sgd(summary)
        speed = best_speedup(summary)
        markdown = render_markdown(summary, statements, speed, spec_name, seeds)
        standing = sharp_minmax_standing(all_rows) if sweep else []
        if sweep:
            markdown += ("\n## Where Sharp MinMax stands (tuned cells, ToW)\n\n"
                         + "".join(f"- {line}\n" for line in standing)
                         + "\n" + render_tuned(tuned or {}, trials, seeds[0], epochs))
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
            "summary": str(summary_path), "speedup": speed, "sam_vs_sgd": statements,
            "sharp_minmax_standing": standing, "tuned": tuned}


#: what ``--sweep`` searches per method (the learning rate always; the method's own weights where it has them)
SWEEP_SPACE: dict[str, dict[str, Any]] = {
    "neggrad": {"method.alpha": {"uniform": [0.9, 0.999]}},
    "sharp_minmax": {"method.alpha": {"uniform": [0.9, 0.999]}, "method.mask_fraction": {"uniform": [0.2, 0.8]},
                     "method.rho_max": {"loguniform": [0.01, 0.2]}},
    "salun": {"method.mask_fraction": {"uniform": [0.2, 0.8]}},
    "l1_sparse": {"method.l1_weight": {"loguniform": [1e-5, 1e-3]}},
    "scrub": {"method.temperature": {"choice": [2.0, 4.0]}},
}
#: ``--sweep`` adds the released code's Sharp MinMax (the packaged preset) as a cell of its own
PAPER_ENTRY = "sharp_minmax@paper_code"
PAPER_LABEL = "sharp_minmax[paper_code]"
DEFAULT_TRIALS = 6


def with_paper_code(spec: dict[str, Any], preset_name: str) -> dict[str, Any]:
    """The spec plus the paper-code Sharp MinMax entry: the project's entry with the preset applied."""
    out = copy.deepcopy(spec)
    methods = dict(out.get("methods") or {})
    if "sharp_minmax" not in methods:
        return out
    methods[PAPER_ENTRY] = paper_code_entry(methods["sharp_minmax"] or {}, load_yaml(preset_name), preset_name,
                                            unlearn_train(spec))
    out["methods"] = methods
    return out


def fix_epochs(spec: dict[str, Any], epochs: int) -> dict[str, Any]:
    """``--epochs``: every method entry runs ``epochs`` unlearning epochs (tuning and tuned grid alike)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"--epochs={epochs!r} is not valid; expected an integer >= 1")
    out = copy.deepcopy(spec)
    out["methods"] = {entry: {**(over or {}), "epochs": epochs} for entry, over in (out.get("methods") or {}).items()}
    return out


def tune_methods(spec: dict[str, Any], seed: int, output_dir: str, tracking: dict, quiet: bool,
                 num_samples: int = DEFAULT_TRIALS) -> dict[str, dict[str, Any]]:
    """``--sweep``: tune every (method entry, unlearn optimizer) cell with the same Ray Tune budget
    (``num_samples`` trials, ASHA on ToW) on the last level's forget set of ``seed``, SGD-pretrained.

    Returns ``{"entry/opt": {"params": best settings, "tow": the best trial's ToW, "trials": trials run,
    "sweep": sweep name}}``: each cell's best from its own sweep (a cell whose trials all failed is
    absent and keeps the spec's settings). Each sweep is an MLflow parent run of its own.
    """
    import logging

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"--trials={num_samples!r} is not valid; expected an integer >= 1")
    # one Ray session for every cell's sweep (each sweep reuses it): starting Ray once per cell cost
    # ~10 s each, and on a busy machine every start is a chance of Ray's 30 s node-startup timeout
    with ray_session(log_to_driver=False, logging_level=logging.WARNING if quiet else logging.INFO):
        return _tune_cells(spec, seed, output_dir, tracking, quiet, num_samples)


def _tune_cells(spec: dict[str, Any], seed: int, output_dir: str, tracking: dict, quiet: bool,
                num_samples: int) -> dict[str, dict[str, Any]]:
    level = (spec.get("levels") or [spec["forget"].get("level", "high")])[-1]
    per_cell: dict[str, dict[str, Any]] = {}
    for entry, over in (spec.get("methods") or {}).items():
        method_name = method_of(entry)
        over = dict(over or {})
        optimizers = over.pop("optimizers", None) or spec["unlearn_optimizers"]
        optimizer_over = dict(over.pop("optimizer", None) or {})
        for opt in optimizers:
            search = {"optimizer.lr": {"loguniform": [0.002, 0.1]}, **SWEEP_SPACE.get(method_name, {})}
            # the budget is in the name: a rerun with the same budget reuses its finished trials
            name = f"reproduce-{entry.replace('@', '-')}-{opt}-s{seed}-n{num_samples}-e{over.get('epochs', 'spec')}"
            raw = {"name": name, "stage": "unlearn",
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
            per_cell[f"{entry}/{opt}"] = {"params": {key: outcome.best[key] for key in search if key in outcome.best},
                                          "tow": outcome.best.get("tow"), "trials": len(outcome.rows),
                                          "sweep": name}
    return per_cell


def apply_tuned(spec: dict[str, Any]) -> dict[str, Any]:
    """Fold ``spec["tuned"]`` (``{"entry/opt": {"optimizer.lr": .., "method.alpha": ..}}``) into per-method,
    per-optimizer entries the grid understands (one method entry per tuned optimizer)."""
    tuned = spec.pop("tuned", {}) or {}
    methods = dict(spec.get("methods") or {})
    out: dict[str, Any] = {}
    for entry, over in methods.items():
        over = dict(over or {})
        optimizers = over.pop("optimizers", None) or spec["unlearn_optimizers"]
        for opt in optimizers:
            cell = copy.deepcopy(over)
            cell["optimizers"] = [opt]
            for key, value in tuned.get(f"{entry}/{opt}", {}).items():
                section, field_name = key.split(".", 1)
                if section == "optimizer":
                    cell.setdefault("optimizer", {})[field_name] = value
                else:
                    cell[field_name] = value
            out[entry if len(optimizers) == 1 else f"{entry}@{opt}"] = cell
    spec["methods"] = out
    return spec


def relabel_paper_code(grid) -> None:
    """The paper-code entry's rows (grid rows, evaluation rows, long rows) get their own method label."""
    run_ids = set()
    for row in [*grid.rows, *grid.evaluation]:
        if str(row.get("entry", "")).startswith(PAPER_ENTRY):
            row["method"] = PAPER_LABEL
            if row.get("run_id"):
                run_ids.add(row["run_id"])
    for row in grid.long_rows:
        if row.get("run_id") in run_ids:
            row["method"] = PAPER_LABEL


def sharp_minmax_standing(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per (level, pretrain): is a Sharp MinMax cell the best on ToW? If not, by how much does the best
    cell beat the best Sharp MinMax cell (mean paired difference over seeds, 95 % CI)?"""
    tow: dict[tuple, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if row["method"] in ("original", "retrain") or not isinstance(row.get("tow"), (int, float)):
            continue
        tow[(row["level"], row["pretrain"], row["method"], row["unlearn_opt"])][row["seed"]] = float(row["tow"])
    lines = []
    cells = sorted({(k[0], k[1]) for k in tow}, key=lambda c: ({"low": 0, "mid": 1, "high": 2}.get(c[0], 9), c[1]))
    for level, pretrain in cells:
        arms = {(m, o): v for (lv, pr, m, o), v in tow.items() if (lv, pr) == (level, pretrain)}
        means = {arm: mean_ci95(list(v.values())) for arm, v in arms.items()}
        best = max(means, key=lambda a: means[a][0])
        smm = [a for a in means if a[0].startswith("sharp_minmax")]
        where = f"{level}, pretrain {pretrain}"
        if not smm:
            continue
        best_smm = max(smm, key=lambda a: means[a][0])
        named = ", ".join(f"{m} ({o}) {fmt_mean_ci(*means[(m, o)])}" for m, o in sorted(smm))
        if best in smm:
            runner_up = max((a for a in means if a not in smm), key=lambda a: means[a][0], default=None)
            tail = "" if runner_up is None else (f"; next: {runner_up[0]} ({runner_up[1]}) "
                                                 f"{fmt_mean_ci(*means[runner_up])}")
            lines.append(f"{where}: Sharp MinMax is best: {named}{tail}")
            continue
        seeds = sorted(set(arms[best]) & set(arms[best_smm]))
        mean, half = mean_ci95([arms[best][s] - arms[best_smm][s] for s in seeds])
        verdict = "significant" if is_significant(mean, half) else "not significant"
        lines.append(f"{where}: Sharp MinMax is NOT best: {best[0]} ({best[1]}) {fmt_mean_ci(*means[best])} beats "
                     f"the best Sharp MinMax cell, {best_smm[0]} ({best_smm[1]}), by {_signed(mean, half)} ToW "
                     f"(paired over {len(seeds)} seeds, {verdict}); Sharp MinMax cells: {named}")
    return lines


def render_tuned(tuned: dict[str, dict[str, Any]], trials: int, seed: int, epochs: int | None) -> str:
    epochs_text = epochs if epochs else "each method's spec value"
    lines = [f"## Tuned settings (Ray Tune, {trials} trials per cell, ASHA on ToW; seed {seed}, the last level's "
             f"forget set, SGD-pretrained; unlearning epochs: {epochs_text})",
             "", "| cell | best trial ToW | trials | settings |", "|---|---|---|---|"]
    for cell, found in tuned.items():
        settings = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in found["params"].items())
        tow_value = found.get("tow")
        lines.append(f"| {cell} | {tow_value:.3f} | {found['trials']} | {settings} |" if isinstance(tow_value, float)
                     else f"| {cell} | | {found['trials']} | {settings} |")
    return "\n".join(lines) + "\n"
