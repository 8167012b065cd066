"""``sharp-unlearn compare``: runs side by side, a summary over seeds, an HTML report with plots.

Select runs by experiment name(s), an ``mlflow.search_runs`` filter string,
and/or run ids (all criteria given must match). Writes to ``--out``:
``comparison.{md,csv,parquet}``, ``summary.{csv,parquet}``, ``results.parquet``,
``figures/*.png`` and a self-contained ``report.html``; prints the table; logs
the report to a new ``kind=compare`` run (or, with ``--log-to RUN_ID``, into an
existing run such as a sweep's parent run).
"""
from __future__ import annotations

import argparse
import datetime as _dt

from sharp_unlearn.commands.base import COMMANDS, Command

# lazy: the sharp_unlearn imports inside the functions below keep `sharp-unlearn --help` fast: cli.py
# imports every command, and the recipes a command runs import torch, and mlflow or ray

#: columns the terminal shows (the files hold them all)
_TERMINAL_IDS = ("run_id", "kind", "method", "optimizer", "pretrain_optimizer", "forget_set", "seed", "status")
_TERMINAL_METRICS = ("tow", "forget_acc", "retain_acc", "test_acc", "mia_efficacy", "wall_seconds")


@COMMANDS.register("compare")
class Compare(Command):
    help = "compare MLflow runs: side-by-side table, summary over seeds, HTML report with plots"

    def add_arguments(self, parser):
        parser.add_argument("--experiment", "-e", action="append", default=[], metavar="NAME",
                            help="MLflow experiment name (repeatable; default: every experiment when a filter "
                                 "or run ids are given, else 'sharp-unlearn')")
        parser.add_argument("--filter", default=None, metavar="EXPR",
                            help="mlflow.search_runs filter, e.g. \"tags.kind = 'unlearn' and params.seed = '0'\"")
        parser.add_argument("--run-ids", nargs="+", default=[], metavar="ID", help="exact run ids")
        parser.add_argument("--with-lineage", action="store_true",
                            help="add the pretrain and retrain-reference runs the selected runs point to")
        parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                            help="add the 'original' (do nothing) and 'retrain' reference rows from the unlearning "
                                 "runs' result tables (default: on)")
        parser.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                            help="metric columns (default: every final metric, contract names first)")
        parser.add_argument("--params", nargs="+", default=[], metavar="KEY",
                            help="param columns always shown (swept params that differ are added anyway)")
        parser.add_argument("--max-runs", type=int, default=1000, help="at most this many runs (default 1000)")
        parser.add_argument("--out", default="runs/compare", metavar="DIR",
                            help="where the tables and report.html go (default runs/compare)")
        parser.add_argument("--title", default=None, help="report title")
        parser.add_argument("--tracking-uri", default=None,
                            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)")
        log = parser.add_mutually_exclusive_group()
        log.add_argument("--log-to", default=None, metavar="RUN_ID",
                         help="log the report into this existing run instead of a new kind=compare run")
        log.add_argument("--no-log", action="store_true", help="write files only; log nothing to MLflow")
        parser.add_argument("--log-experiment", default=None, metavar="NAME",
                            help="experiment of the kind=compare run (default: the selected experiment, "
                                 "else 'sharp-unlearn')")

    def run(self, args):
        from sharp_unlearn.errors import ConfigError
        from sharp_unlearn.report import baseline_rows, build_comparison, select_runs, write_report
        from sharp_unlearn.tracking import client_for, preflight

        if args.max_runs < 1:
            raise ConfigError(f"--max-runs={args.max_runs} must be at least 1")
        uri = preflight(args.tracking_uri)
        client = client_for(uri)
        experiments = list(args.experiment)
        if not experiments and not args.filter and not args.run_ids:
            experiments = ["sharp-unlearn"]
        runs = select_runs(client, experiments=experiments, filter_string=args.filter, run_ids=args.run_ids,
                           max_results=args.max_runs, with_lineage=args.with_lineage)
        baselines = baseline_rows(client, runs) if args.baselines else []
        comparison = build_comparison(runs, metrics=args.metrics, params=args.params, baselines=baselines)
        selection = {"experiments": experiments or "all", "filter": args.filter or "",
                     "run_ids": " ".join(args.run_ids) or ""}
        title = args.title or f"sharp-unlearn comparison of {len(runs)} runs"
        meta = {"tracking URI": uri, **{k: v for k, v in selection.items() if v},
                "generated": _dt.datetime.now().isoformat(timespec="seconds")}
        files = write_report(comparison, args.out, title=title, meta=meta)
        logged_to = None if args.no_log else _log_report(client, uri, args, experiments, files, runs, selection)

        if not args.json and not args.quiet:
            from sharp_unlearn.commands.console import print_rows

            columns = [c for c in _TERMINAL_IDS if c in comparison.columns]
            columns += [c for c in comparison.param_columns]
            columns += [c for c in _TERMINAL_METRICS if c in comparison.metric_columns]
            rows = [{**{k: ("" if v is None else v) for k, v in row.items()}, "run_id": row["run_id"][:8]}
                    for row in comparison.rows]
            print_rows(title, columns, rows)
        if not args.json:
            print(f"wrote {files.html} (and comparison.md/.csv/.parquet, summary, figures) to {files.out_dir}")
            if logged_to:
                print(f"logged the report to run {logged_to}")
        return {"runs": comparison.table_rows(), "out_dir": str(files.out_dir), "html": str(files.html),
                "logged_to": logged_to}


def _log_report(client, uri, args, experiments, files, runs, selection) -> str:
    """Log every output file into ``--log-to`` or a new kind=compare run; returns that run's id."""
    from mlflow.exceptions import MlflowException

    from sharp_unlearn.errors import ConfigError
    from sharp_unlearn.tracking import MlflowTracker, tracked_run

    def log_files(tracker) -> None:
        for path in files.all():
            sub = "figures" if path.parent.name == "figures" else None
            tracker.log_artifact(path, f"compare/{sub}" if sub else "compare")

    if args.log_to:
        try:
            client.get_run(args.log_to)
        except MlflowException:
            raise ConfigError(f"--log-to run {args.log_to!r} does not exist in {uri}") from None
        log_files(MlflowTracker(client, args.log_to, max_artifact_mb=1e9, uri=uri))
        return args.log_to
    experiment = args.log_experiment or (experiments[0] if len(experiments) == 1 else "sharp-unlearn")
    ids = " ".join(r.info.run_id for r in runs)
    tags = {"compared_runs": len(runs), "compared_run_ids": ids, "compare_filter": selection["filter"] or None}
    with tracked_run(uri=uri, experiment=experiment, kind="compare", tags=tags,
                     run_name=f"compare-{len(runs)}-runs", max_artifact_mb=1e9) as tracker:
        log_files(tracker)
    return tracker.run_id
