"""``sharp-unlearn sweep tuning/<file>.yaml``: a Ray Tune sweep, locally or on a cluster."""
from __future__ import annotations

import contextlib

from sharp_unlearn.commands.base import COMMANDS, Command, add_deterministic_argument
from sharp_unlearn.progress import stdout_to_stderr

# lazy: the sharp_unlearn imports inside the functions below keep `sharp-unlearn --help` fast: cli.py
# imports every command, and the recipes a command runs import torch, and mlflow or ray


@COMMANDS.register("sweep")
class Sweep(Command):
    help = "run a Ray Tune sweep defined in a YAML file (tuning/*.yaml), locally or on a Ray cluster"

    def add_arguments(self, parser):
        parser.add_argument("sweep", metavar="FILE", help="sweep definition, e.g. tuning/smoke.yaml")
        parser.add_argument("--address", default=None,
                            help="Ray cluster to join (default: $RAY_ADDRESS, else a local instance for this run)")
        parser.add_argument("--resume", action="store_true",
                            help="continue a stopped sweep (same file, --storage and --name): finished trials "
                                 "are kept, unfinished ones resume from their last checkpoint")
        parser.add_argument("--num-samples", type=int, default=None, metavar="N",
                            help="samples of the search space (grids are repeated N times); overrides the file")
        parser.add_argument("--max-concurrent", type=int, default=None, metavar="K",
                            help="at most K trials at once (default: as many as the resources allow)")
        parser.add_argument("--storage", default=None, metavar="DIR",
                            help="where Ray keeps trials and checkpoints (default: <output_dir>/sweeps; a shared "
                                 "path or s3:// URI on a cluster)")
        parser.add_argument("--name", default=None, help="sweep name (default: the file's `name`, else its stem)")
        parser.add_argument("--num-cpus", type=int, default=None, metavar="N",
                            help="CPUs of the local Ray instance (default: all of this machine's)")
        parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlruns.db)")
        parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
        add_deterministic_argument(parser)
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="overrides of the sweep file, e.g. num_samples=4 base.train.epochs=10")

    def run(self, args):
        from sharp_unlearn.config import load_yaml
        from sharp_unlearn.errors import ConfigError
        from sharp_unlearn.tuning import SweepInterrupted, load_sweep, run_sweep
        from sharp_unlearn.tuning.lm import is_lm_sweep

        for flag, value in (("--num-samples", args.num_samples), ("--max-concurrent", args.max_concurrent),
                            ("--num-cpus", args.num_cpus)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag}={value} must be at least 1")
        if args.resume and args.num_samples is not None:
            raise ConfigError("--num-samples cannot change when resuming; the sweep keeps its own")
        tracking = {}
        if args.no_tracking:
            tracking["enabled"] = False
        if args.tracking_uri:
            tracking["uri"] = args.tracking_uri
        if is_lm_sweep(load_yaml(args.sweep)):
            return _run_lm(args)
        # everything is validated here, before Ray starts
        overrides = [*args.overrides, *(["base.deterministic=true"] if args.deterministic else [])]
        spec = load_sweep(args.sweep, overrides, num_samples=args.num_samples,
                          max_concurrent=args.max_concurrent, storage=args.storage, name=args.name,
                          tracking=tracking)
        if not args.quiet and not args.json:
            print(f"sweep {spec.name}: stage {spec.stage}, {spec.total_trials} trials "
                  f"({spec.num_samples} sample(s) x grid {spec.grid_size}), {spec.objective.describe()}, "
                  f"scheduler {spec.scheduler.name}, searcher {spec.searcher.name}, "
                  + (f"{spec.resources.cpu:g} CPU / {spec.resources.gpu:g} GPU per trial" if spec.sharded is None
                     else f"ZeRO-{spec.sharded.zero_stage} x {spec.sharded.num_workers} workers per trial "
                          f"({spec.resources.cpu:g} CPU / {spec.resources.gpu:g} GPU each)"))
        # --json: stdout carries one JSON document, so what Ray Tune prints (its experiment and
        # progress tables) goes to stderr while the sweep runs
        with stdout_to_stderr() if args.json else contextlib.nullcontext():
            try:
                outcome = run_sweep(spec, address=args.address, resume=args.resume, num_cpus=args.num_cpus,
                                    quiet=args.quiet or args.json)
            except SweepInterrupted as exc:
                outcome = getattr(exc, "outcome", None)
                if outcome is not None and not args.json:
                    _print(outcome, spec)
                resume = f"sharp-unlearn sweep {args.sweep} --resume --storage {spec.storage} --name {spec.name}"
                print(f"sharp-unlearn sweep: {exc}; resume with: {resume}")
                raise
        if not args.json:
            _print(outcome, spec)
        return {"name": outcome.name, "experiment_dir": outcome.experiment_dir, "parent_run_id": outcome.parent_run_id,
                "best": outcome.best, "rows": outcome.rows, "baseline": outcome.baseline_rows,
                "results": outcome.results_path, "best_config": outcome.best_config_path,
                "best_checkpoint": outcome.best_checkpoint_path}


def _run_lm(args) -> dict:
    """A ``task: lm`` sweep: trials of the LM recipe (no MLflow runs, no resume; see tuning/lm.py)."""
    from sharp_unlearn.commands.console import print_rows
    from sharp_unlearn.errors import ConfigError
    from sharp_unlearn.tuning.lm import LM_METRICS, load_lm_sweep, run_lm_sweep

    if args.resume or args.deterministic:
        raise ConfigError("--resume and --deterministic are not supported by task: lm sweeps (their trials keep "
                          "no checkpoints); run the sweep again without them")
    spec = load_lm_sweep(args.sweep, args.overrides, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                         storage=args.storage, name=args.name)
    if not args.quiet and not args.json:
        print(f"sweep {spec.name}: task lm, method {spec.method['name']} ({spec.optimizer}), {spec.total_trials} "
              f"trials, {spec.objective.describe()}, scheduler {spec.scheduler.name}")
    with stdout_to_stderr() if args.json else contextlib.nullcontext():
        outcome = run_lm_sweep(spec, address=args.address, num_cpus=args.num_cpus, quiet=args.quiet or args.json)
    if not args.json:
        print_rows(f"sweep {outcome.name}: {spec.objective.describe()}",
                   ["trial_id", *spec.keys, "epochs", "objective", *LM_METRICS[:4]], outcome.rows)
        if outcome.best is not None:
            print(f"best trial {outcome.best['trial_id']}: objective {outcome.best['objective']:.4f}")
        print(f"results: {outcome.results_path} and {outcome.markdown_path}")
    return {"name": outcome.name, "rows": outcome.rows, "best": outcome.best, "results": outcome.results_path}


def _print(outcome, spec) -> None:
    from sharp_unlearn.commands.console import print_rows

    # searched keys shown by their last part when that is unambiguous (method.rho_min -> rho_min)
    last = [k.split(".")[-1] for k in spec.keys]
    label = {k: (short if last.count(short) == 1 else k) for k, short in zip(spec.keys, last, strict=True)}
    # the terminal table leaves out what the files keep (val_acc, train_loss)
    columns = [label.get(c, c) for c in outcome.columns if c not in ("val_acc", "train_loss")]
    rows = []
    for row in (*outcome.baseline_rows, *outcome.rows):
        shown = {label.get(k, k): (f"{v:.4g}" if isinstance(v, float) and k in label else v) for k, v in row.items()}
        # * = stopped early by the scheduler, ! = diverged (worst objective)
        shown["trial_id"] = row["trial_id"] + ("*" if row.get("stopped_early") else "") + (
            "!" if row.get("diverged") else "")
        rows.append(shown)
    print_rows(f"sweep {outcome.name}: {spec.objective.describe()}", columns, rows)
    if any(r.get("stopped_early") for r in outcome.rows):
        print("* stopped early by the scheduler (the table shows its last reported epoch)")
    if any(r.get("diverged") for r in outcome.rows):
        print("! diverged (loss became NaN/inf): scored as the worst objective")
    best = outcome.best
    if best is not None:
        print(f"best trial {best['trial_id']}: objective {best['objective']:.4f}"
              + (f", tow {best['tow']:.4f}" if "tow" in best else ""))
        for key in spec.keys:
            print(f"  {key} = {best[key]}")
        print(f"best config: {outcome.best_config_path}")
        if outcome.best_checkpoint_path:  # sharded sweeps: the consolidated fp32 weights `evaluate` loads
            print(f"best checkpoint: {outcome.best_checkpoint_path}")
    else:
        print("no trial finished all its epochs within the constraints: no best config")
    print(f"results: {outcome.results_path} and {outcome.markdown_path}")
    if outcome.parent_run_id:
        print(f"MLflow parent run {outcome.parent_run_id}; compare its trials with:\n"
              f"  sharp-unlearn compare --filter \"tags.mlflow.parentRunId = '{outcome.parent_run_id}'\"")
