"""The ablation: which of the paper's released-code choices changes what Sharp MinMax does?

From the project's Sharp MinMax to the released code's (the packaged preset
``sharp_minmax_paper_code``): each switch alone (``method.mask_order``,
``method.forget_mask_scope``, ``method.forget_perturbation``,
``method.update_order``), the preset's other settings alone (optimizer, rho,
alpha, ...: ``paper_defaults``) and everything together (``paper_code``); and
the mask order alone for SalUn, whose mask the released code builds with the
same generator.

The setting is the demo's (its grid spec, so its pretrained SGD and SAM
models and retrained references come from the same caches), with forget
sets at memorization low / mid / high from held-out scores per seed (as in
``reproduce table``). A variant and its baseline share each seed's
pretrained model, forget set and reference, so each seed gives one paired
difference; a switch *changes* a metric in a cell where the 95 % CI of the
mean paired difference over seeds excludes 0.

Outputs: ``runs.parquet`` (one row per run), ``summary.parquet`` (mean and
95 % CI per variant), ``effects.parquet`` (paired differences), ``report.md``,
all logged to one ``kind=reproduce`` MLflow parent run (tag
``reproduce=ablation``) whose children are every stage's own run; each
unlearning child carries its variant as the tag ``ablation_variant``.
"""
from __future__ import annotations

import copy
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharp_unlearn.config import apply_overrides, load_yaml, merge
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.files import atomic_path, atomic_write
from sharp_unlearn.progress import stage
from sharp_unlearn.recipes.demo import log_grid_summary, parent_run
from sharp_unlearn.recipes.grid import method_of, model_evaluator, run_grid
from sharp_unlearn.reproduce.memorization_scores import memorization_scores
from sharp_unlearn.reproduce.paper_code import (
    PRESET,
    SWITCHES,
    paper_code_entry,
    preset_parts,
    unlearn_train,
    with_optimizer,
)
from sharp_unlearn.stats import fmt_mean_ci, is_significant, mean_ci95
from sharp_unlearn.tracking import check_tracking, children_of, client_for
from sharp_unlearn.validation import config_from_dict

#: the grid spec whose base (data, model, pretraining recipe) and method settings the ablation keeps
DEMO_SPEC = "demo_digits"
#: where the held-out memorization settings come from (the same estimator as ``reproduce table``)
TABLE_SPEC = "reproduce_digits"
#: metrics reported per variant (mean ± CI) and as paired differences against the baseline
METRICS = ("tow", "forget_gap", "mia_efficacy", "test_acc")
METRIC_LABELS = {"tow": "ToW", "forget_gap": "forget gap (pts)", "mia_efficacy": "MIA efficacy",
                 "test_acc": "test acc (%)"}
LEVEL_ORDER = {"low": 0, "mid": 1, "high": 2}


@dataclass(frozen=True)
class Variant:
    """One arm of the ablation: a grid entry ``method@name`` and the arm it is compared with."""

    method: str
    name: str
    overrides: dict[str, Any] = field(compare=False, hash=False)
    baseline: str | None = None  # the entry of the arm it is compared with; None for a baseline

    @property
    def entry(self) -> str:
        return f"{self.method}@{self.name}"


def ablation_spec(overrides: Sequence[str] = (), spec_path: str | None = None) -> dict[str, Any]:
    """The ablation's grid spec: the demo's, crossed with memorization levels and seeds.

    ``spec_path`` replaces the derived spec with a complete one of the same shape (tests, other data).
    """
    if spec_path:
        spec = load_yaml(spec_path)
    else:
        spec = copy.deepcopy(load_yaml(DEMO_SPEC))
        table = load_yaml(TABLE_SPEC)
        # the demo's hard forget set is the flipped labels (two levels only); the memorization levels
        # need a graded score, and the held-out estimate is the one the table uses
        spec["forget"] = {**spec["forget"], "scores": "heldout"}
        spec["forget"].pop("level", None)
        spec["memorization"] = copy.deepcopy(table["memorization"])
        spec["levels"] = ["low", "mid", "high"]
        spec["seeds"] = [0, 1, 2]
        spec["evaluate"] = ["mia"]
        spec["preset"] = PRESET
        # only the two ablated methods run; their settings stay the demo's
        spec["methods"] = {name: spec["methods"][name] for name in ("sharp_minmax", "salun")}
    spec = apply_overrides(spec, list(overrides))
    for key in ("base", "forget", "pretrain_optimizers", "unlearn_optimizers", "methods"):
        if key not in spec:
            raise ConfigError(f"ablation spec lacks {key!r}; expected the keys of a grid spec "
                              "(base, forget, pretrain_optimizers, unlearn_optimizers, methods)")
    for name in ("sharp_minmax", "salun"):
        if name not in (spec.get("methods") or {}):
            raise ConfigError(f"ablation spec's methods lack {name!r}; expected entries for sharp_minmax and salun")
    return spec


def build_variants(methods: dict[str, Any], preset: dict[str, Any], source: str = PRESET,
                   train: Any = None) -> list[Variant]:
    """The arms: project Sharp MinMax, each switch alone, the preset's other settings, the whole preset;
    project SalUn and SalUn with the preset's mask order (``train``: see :func:`preset_parts`)."""
    paper_method, paper_optimizer = preset_parts(preset, source, train)
    smm = dict(methods.get("sharp_minmax") or {})
    salun = dict(methods.get("salun") or {})
    project = Variant("sharp_minmax", "project", smm)
    arms = [project]
    for switch in SWITCHES:
        arms.append(Variant("sharp_minmax", f"{switch}={paper_method[switch]}",
                            merge(smm, {switch: paper_method[switch]}), project.entry))
    defaults = {k: v for k, v in paper_method.items() if k not in SWITCHES}
    arms.append(Variant("sharp_minmax", "paper_defaults", with_optimizer(merge(smm, defaults), paper_optimizer),
                        project.entry))
    arms.append(Variant("sharp_minmax", "paper_code", paper_code_entry(smm, preset, source, train), project.entry))
    salun_project = Variant("salun", "project", salun)
    arms += [salun_project, Variant("salun", f"mask_order={paper_method['mask_order']}",
                                    merge(salun, {"mask_order": paper_method["mask_order"]}), salun_project.entry)]
    return arms


def check_arms(spec: dict[str, Any], output_dir: str, tracking: dict[str, Any]) -> None:
    """Build every arm's unlearning config at every level now: a bad value fails before any training."""
    for level in spec.get("levels") or [spec["forget"].get("level", "high")]:
        for entry, over in spec["methods"].items():
            over = dict(over or {})
            optimizers = over.pop("optimizers", None) or spec["unlearn_optimizers"]
            optimizer_over = dict(over.pop("optimizer", None) or {})
            for opt in optimizers:
                arm = {"optimizer": {**optimizer_over, "name": opt}, "forget": {**spec["forget"], "level": level},
                       "method": {"name": method_of(entry), **over}, "output_dir": output_dir, "tracking": tracking}
                config_from_dict(merge(merge(spec["base"], copy.deepcopy(spec.get("unlearn", {}))), arm))


# ----------------------------------------------------------------------------- statistics
def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and 95 % CI half-width over seeds per (level, pretrain, method, variant, unlearn optimizer)."""
    keys = ("level", "pretrain", "method", "variant", "unlearn_opt")
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for metric in (*METRICS, "retain_acc", "forget_acc", "wall_seconds"):
            value = row.get(metric)
            if isinstance(value, (int, float)) and value == value:
                groups[tuple(row[k] for k in keys)][metric].append(float(value))
    out = []
    for key, metrics in groups.items():
        entry: dict[str, Any] = dict(zip(keys, key, strict=True))
        entry["seeds"] = max(len(v) for v in metrics.values())
        for metric, values in metrics.items():
            entry[metric], entry[f"{metric}_ci95"] = mean_ci95(values)
        out.append(entry)
    return sorted(out, key=_order)


def _order(entry: dict[str, Any]) -> tuple:
    head = {"original": 0, "retrain": 1}
    return (LEVEL_ORDER.get(entry["level"], 9), entry["pretrain"], head.get(entry["method"], 2), entry["method"],
            entry["unlearn_opt"], entry["variant"] != "project", entry["variant"])


def paired_effects(rows: Sequence[dict[str, Any]], variants: Sequence[Variant]) -> list[dict[str, Any]]:
    """Per variant with a baseline, cell and metric: the mean paired difference (variant - baseline,
    same seed) with its 95 % CI, and whether the CI excludes 0.

    A cell is (level, pretraining optimizer) and, for an arm run with several unlearning optimizers
    (SalUn with SGD and SAM), the unlearning optimizer too: each is paired with the baseline's run
    on the same optimizer. An arm with one optimizer (Sharp MinMax's SAM pair, whose tag changes with
    the preset's base optimizer) pairs with the baseline's only run.
    """
    tags: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        tags[row["entry"]].add(row["unlearn_opt"])
    several = {entry for entry, found in tags.items() if len(found) > 1}

    def opt_key(entry: str, tag: str) -> str:
        return tag if entry in several else ""

    values: dict[tuple, float] = {}
    for row in rows:
        for metric in METRICS:
            value = row.get(metric)
            if isinstance(value, (int, float)) and value == value:
                values[(row["entry"], row["level"], row["pretrain"], opt_key(row["entry"], row["unlearn_opt"]),
                        row["seed"], metric)] = float(value)
    seeds = sorted({r["seed"] for r in rows})
    out = []
    for variant in variants:
        if variant.baseline is None:
            continue
        cells = sorted({(r["level"], r["pretrain"], r["unlearn_opt"]) for r in rows if r["entry"] == variant.entry},
                       key=lambda c: (LEVEL_ORDER.get(c[0], 9), c[1], c[2]))
        for level, pretrain, tag in cells:
            arm = (variant.entry, level, pretrain, opt_key(variant.entry, tag))
            base = (variant.baseline, level, pretrain, opt_key(variant.baseline, tag))
            for metric in METRICS:
                diffs = [values[(*arm, s, metric)] - values[(*base, s, metric)]
                         for s in seeds if (*arm, s, metric) in values and (*base, s, metric) in values]
                if not diffs:
                    continue
                mean, half = mean_ci95(diffs)
                out.append({"method": variant.method, "variant": variant.name, "baseline": variant.baseline,
                            "level": level, "pretrain": pretrain, "unlearn_opt": tag,
                            "per_optimizer": variant.entry in several, "metric": metric, "diff": mean,
                            "ci95": half, "seeds": len(diffs), "significant": is_significant(mean, half)})
    return out


def verdicts(effects: Sequence[dict[str, Any]], metric: str = "tow") -> list[str]:
    """One line per variant: where it changes ``metric`` (paired 95 % CI excludes 0), and where not."""
    lines = []
    label = METRIC_LABELS.get(metric, metric).split(" (")[0]
    arms = list(dict.fromkeys((e["method"], e["variant"]) for e in effects if e["metric"] == metric))
    for method, name in arms:
        cells = [e for e in effects if e["metric"] == metric and (e["method"], e["variant"]) == (method, name)]
        changed = [f"{_signed(e['diff'], e['ci95'])} on {_cell(e)}" for e in cells if e["significant"]]
        unchanged = [_cell(e) for e in cells if not e["significant"]]
        parts = []
        if changed:
            parts.append(f"changes {label} by " + ", ".join(changed))
        if unchanged:
            parts.append("not significant on " + ", ".join(unchanged))
        seeds = min(e["seeds"] for e in cells)
        lines.append(f"{method} {name} (vs project {method}, {seeds} seeds): " + "; ".join(parts))
    return lines


def _cell(effect: dict[str, Any]) -> str:
    unlearn = f", unlearning with {effect['unlearn_opt'].upper()}" if effect.get("per_optimizer") else ""
    return f"{effect['level']} ({effect['pretrain'].upper()}-pretrained{unlearn})"


def _signed(mean: float, half: float | None) -> str:
    return f"{mean:+.3f}" if half is None or half != half else f"{mean:+.3f} ± {half:.3f}"


# ----------------------------------------------------------------------------- report
def render_markdown(summary, effects, lines, seeds: Sequence[int], preset_name: str) -> str:
    out = [f"# Sharp MinMax ablation: project -> released code ({preset_name}), seeds "
           f"{', '.join(map(str, seeds))}", "",
           "Each arm changes one thing from the project's Sharp MinMax (or SalUn) towards the released code; "
           "`paper_defaults` is the preset's settings other than the four switches, `paper_code` the whole "
           "preset. An arm *changes* a metric in a cell where the 95 % CI of its mean paired difference with "
           "the baseline (same seed: same pretrained model, forget set and reference) excludes 0.", "",
           "## Verdicts (ToW)", ""]
    out += [f"- {line}" for line in lines] + [""]
    for level in dict.fromkeys(s["level"] for s in summary):
        out += [f"## Forget set: memorization {level}", "",
                "| pretrain | method | variant | unlearn | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |",
                "|---|---|---|---|" + "---|" * len(METRICS)]
        for s in summary:
            if s["level"] == level:
                out.append(f"| {s['pretrain']} | {s['method']} | {s['variant']} | {s['unlearn_opt']} | "
                           + " | ".join(fmt_mean_ci(s.get(m), s.get(f"{m}_ci95")) for m in METRICS) + " |")
        out.append("")
    out += ["## Paired differences against the baseline (mean ± 95 % CI; * = CI excludes 0)", "",
            "| level | pretrain | method | variant | unlearn | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |",
            "|---|---|---|---|---|" + "---|" * len(METRICS)]
    cells: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for e in effects:
        cells[(e["level"], e["pretrain"], e["method"], e["variant"], e["unlearn_opt"])][e["metric"]] = e
    for (level, pretrain, method, name, tag), metrics in cells.items():
        values = []
        for m in METRICS:
            e = metrics.get(m)
            values.append("" if e is None else f"{_signed(e['diff'], e['ci95'])}{' *' if e['significant'] else ''}")
        out.append(f"| {level} | {pretrain} | {method} | {name} | {tag} | " + " | ".join(values) + " |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- the run
def run_rows(grid_rows: Sequence[dict[str, Any]], evaluation: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per run: the grid row, its evaluation metrics, and its variant (``original`` /
    ``retrain`` rows keep their method as the variant)."""
    keys = ("seed", "pretrain", "level", "method")
    measured = {tuple(e[k] for k in keys) + (e.get("entry"),): e for e in evaluation}
    out = []
    for row in grid_rows:
        entry = row.get("entry") or row["method"]
        merged = {**row, **{k: v for k, v in measured.get(tuple(row[k] for k in keys) + (row.get("entry"),),
                                                            {}).items() if k not in row}}
        merged["entry"] = entry
        merged["variant"] = entry.split("@", 1)[1] if "@" in entry else "-"
        out.append(merged)
    return out


def run_ablation(*, output_dir: str = "runs/reproduce-ablation", seeds: Sequence[int] | None = None,
                 tracking: dict | None = None, overrides: Sequence[str] = (), quiet: bool = True,
                 spec_path: str | None = None, workers: int | None = None) -> dict[str, Any]:
    """Run every arm over seeds x pretraining optimizers x levels; ``workers`` processes run the
    independent (seed, pretraining optimizer) slices side by side (default: the machine's CPUs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers={workers!r} is not valid; expected an integer >= 1")
    spec = ablation_spec(overrides, spec_path)
    tracking = ablation_tracking(spec, tracking)
    preset_name = str(spec.pop("preset", PRESET))
    variants = build_variants(spec["methods"], load_yaml(preset_name), preset_name, unlearn_train(spec))
    spec["methods"] = {v.entry: v.overrides for v in variants}
    seeds = list(seeds or spec.get("seeds") or [0, 1, 2])
    check_arms(spec, output_dir, tracking)
    out = Path(output_dir)
    base_cfg = config_from_dict(merge(spec["base"], {"output_dir": output_dir, "tracking": tracking}))
    check_tracking(base_cfg)
    with parent_run(spec, output_dir, tracking, "reproduce", "reproduce-ablation") as tracker:
        tracker.set_tags({"reproduce": "ablation", "preset": preset_name})
        slices = []
        for number, seed in enumerate(seeds, 1):
            seed_spec = copy.deepcopy(spec)
            if seed_spec["forget"].get("kind") == "memorization" and seed_spec["forget"].get("scores") == "heldout":
                # the scores train their subset models on every core already (Ray): before the slices
                stage(number, len(seeds), f"seed {seed}: held-out memorization scores", quiet)
                seed_spec["forget"]["scores"] = memorization_scores(spec, seed, output_dir, tracking, quiet)
            slices += [Slice(seed_spec, seed, pre_opt, output_dir, tracking, tracker.run_id, quiet)
                       for pre_opt in spec["pretrain_optimizers"]]
        count = min(workers or _cpus(), len(slices))
        stage(1, 1, f"{len(slices)} slices (seed x pretraining) of {len(variants)} arms x levels, "
                    f"{count} worker{'s' if count > 1 else ''}", quiet)
        rows = [row for part in run_slices(slices, count) for row in part]
        summary = summarize(rows)
        effects = paired_effects(rows, variants)
        lines = verdicts(effects)
        markdown = render_markdown(summary, effects, lines, seeds, preset_name)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"runs": out / "runs.parquet", "summary": out / "summary.parquet",
                 "effects": out / "effects.parquet"}
        columns = ["seed", "pretrain", "level", "method", "variant", "entry", "unlearn_opt", "run_id",
                   *METRICS, "retain_acc", "forget_acc", "mia_auc", "wall_seconds"]
        tables = {"runs": [{c: r.get(c) for c in columns} for r in rows], "summary": summary, "effects": effects}
        for name, table_rows in tables.items():
            with atomic_path(paths[name]) as tmp:
                pq.write_table(pa.Table.from_pylist(table_rows), tmp)
        paths["report"] = atomic_write(out / "report.md", markdown)
        for path in paths.values():
            tracker.log_artifact(path, "report")
        # the parent's ToW table and figure: one "method" per arm so the arms stay apart
        shown = [{**r, "method": r["method"] if r["variant"] == "-" else f"{r['method']}[{r['variant']}]"}
                 for r in rows]
        keys = ("seed", "pretrain", "level", "method", "unlearn_opt")
        log_grid_summary(tracker, shown, [{**{k: r[k] for k in keys}, **{m: r.get(m) for m in METRICS[1:3]}}
                                          for r in shown], "ablation")
    return {**{k: str(v) for k, v in paths.items()}, "verdicts": lines, "report_md": str(paths["report"])}


def ablation_tracking(spec: dict[str, Any], tracking: dict | None) -> dict[str, Any]:
    """The tracking section every stage gets: model logging (a few seconds per run, and no part of
    what the ablation measures) is off unless the caller or ``base.tracking.log_models`` asks for it."""
    tracking = dict(tracking or {})
    tracking.setdefault("log_models", bool((spec["base"].get("tracking") or {}).get("log_models", False)))
    return tracking


# ----------------------------------------------------------------------------- parallel slices
@dataclass(frozen=True)
class Slice:
    """One (seed, pretraining optimizer) share of the grid: its pretraining, references and every arm
    at every level. Slices share no model, so they run in any order, in any process."""

    spec: dict[str, Any] = field(hash=False)  # the seed's spec, its held-out scores already computed
    seed: int
    pretrain: str
    output_dir: str
    tracking: dict[str, Any] = field(hash=False)
    parent_run_id: str | None  # the ablation's MLflow run: every stage of the slice nests under it
    quiet: bool


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_slices(slices: Sequence[Slice], workers: int) -> list[list[dict[str, Any]]]:
    """Each slice's rows, in the order of ``slices`` (the sequential run's order whatever finishes first).

    One worker runs them here, in sequence; more run them in that many spawned processes (torch
    and Ray do not survive a fork). Ctrl-C / SIGTERM stops the workers (their open MLflow runs end
    KILLED, finished caches stay) and re-raises, so the command exits 130.
    """
    if workers <= 1:
        return [run_slice(s) for s in slices]
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=1)
    try:
        pending = [pool.apply_async(run_slice, (s,)) for s in slices]
        results = [p.get() for p in pending]
        pool.close()
    except BaseException:
        pool.terminate()  # SIGTERM to every worker: their tracked runs unwind and end KILLED
        raise
    finally:
        pool.join()
    return results


def run_slice(piece: Slice) -> list[dict[str, Any]]:
    """The rows of one slice, evaluated (MIA, ...) and tagged with their arms; one torch thread unless
    ``base.threads`` says otherwise, in a worker and in sequence alike, so both give the same numbers."""
    import torch

    spec = piece.spec
    base_cfg = config_from_dict(merge(spec["base"], {"output_dir": piece.output_dir, "tracking": piece.tracking}))
    evaluator = model_evaluator(spec.get("evaluate") or ["mia"], Path(piece.output_dir) / "evaluation")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(base_cfg.threads or 1)
    try:
        with children_of(piece.parent_run_id):
            grid = run_grid({**spec, "pretrain_optimizers": [piece.pretrain]}, output_dir=piece.output_dir,
                            tracking=piece.tracking, seeds=[piece.seed], quiet=piece.quiet, evaluator=evaluator,
                            on_run=_variant_tagger(base_cfg.tracking))
    finally:
        torch.set_num_threads(previous_threads)
    return run_rows(grid.rows, grid.evaluation)


def _variant_tagger(tracking):
    """``on_run`` for the grid: tag each unlearning child with its arm (its run name is the method's)."""
    def tag(row: dict[str, Any]) -> None:
        if not tracking.enabled or not row.get("run_id") or not row.get("entry"):
            return

        client_for(tracking.uri).set_tag(row["run_id"], "ablation_variant", row["entry"])

    return tag
