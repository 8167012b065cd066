"""``sharp-unlearn evaluate CHECKPOINT``: accuracy, ToW, MIA, entanglement, sharpness, landscape, UMAP."""
from __future__ import annotations

from sharp_unlearn.commands.base import COMMANDS, Command, add_config_arguments
from sharp_unlearn.commands.console import format_value, print_metrics, print_rows
from sharp_unlearn.progress import progress_bar

# lazy: the sharp_unlearn imports inside the functions below keep `sharp-unlearn --help` fast: cli.py
# imports every command, and the recipes a command runs import torch, and mlflow or ray


@COMMANDS.register("evaluate")
class Evaluate(Command):
    help = ("evaluate a checkpoint: --metrics accuracy,tow,mia,entanglement,sharpness,landscape,umap "
            "(default auto: the cheap ones the checkpoint supports)")

    def add_arguments(self, parser):
        parser.add_argument("checkpoint", nargs="?", default=None,
                            help="checkpoint to evaluate (unlearn, pretrain or retrain); same as --checkpoint")
        parser.add_argument("--checkpoint", dest="checkpoint_option", default=None, metavar="PATH",
                            help="checkpoint to evaluate, as in unlearn/retrain/mask")
        parser.add_argument("--metrics", "-m", default="auto",
                            help="comma-separated metric names, 'all', or 'auto' (default)")
        parser.add_argument("--out", default=None, metavar="DIR",
                            help="where results.parquet, details.json and figures go (default: CHECKPOINT_DIR/eval)")
        parser.add_argument("--reference", default=None, metavar="CHECKPOINT",
                            help="retrained reference for ToW and the calibrated MIA (default: the one the "
                                 "checkpoint names)")
        parser.add_argument("--eval-option", action="append", default=[], metavar="KEY=VALUE",
                            help="sub-sample caps and knobs, e.g. sharpness_samples=256 sam_rho=0.1 "
                                 "landscape_points=11 (repeatable)")
        add_config_arguments(parser)

    def run(self, args):
        from sharp_unlearn.evaluation import parse_metrics
        from sharp_unlearn.metrics import EvalOptions
        from sharp_unlearn.recipes.evaluate import evaluate_checkpoint

        checkpoint = _checkpoint(args)
        names = parse_metrics(args.metrics)  # unknown names: exit 2 before any loading
        options = EvalOptions.from_pairs(args.eval_option)
        overrides = list(args.overrides)
        if args.tracking_uri:  # an explicit URI turns tracking on even if the checkpoint's run had it off
            overrides += [f"tracking.uri={args.tracking_uri}", "tracking.enabled=true"]
        if args.no_tracking:
            overrides.append("tracking.enabled=false")
        if args.deterministic:
            overrides.append("deterministic=true")

        with progress_bar("evaluate", len(names), quiet=args.quiet or args.json) as advance:
            done: list[str] = []

            def progress(name: str) -> None:  # called as each metric starts
                advance(completed=len(done), status=name)
                done.append(name)

            outcome = evaluate_checkpoint(checkpoint, names, out_dir=args.out, options=options,
                                          config_files=args.config, overrides=overrides, reference=args.reference,
                                          progress=progress)
            advance(completed=len(names), status="done")  # the finished bar stays on screen: show it full
        result = outcome.result
        target = outcome.target
        if not args.json:
            title = f"evaluate {target.method}/{target.optimizer} on {target.forget_label}"
            print_rows(title, ["metric", "split", "value"],
                       # one table mixes percentages and scores: each value formatted by its metric's name
                       [{"metric": v.metric, "split": v.split, "value": format_value(v.metric, v.value)}
                        for v in result.values])
            print_metrics("headline (MLflow names)", result.headline)  # prints nothing when empty
            print(f"results: {outcome.results_path}")
            for artifact in result.artifacts:
                print(f"figure: {artifact}" if str(artifact).endswith(".png") else f"file: {artifact}")
        return {"run_id": outcome.run_id, "evaluated_run_id": target.run_id, "results": str(outcome.results_path),
                "out_dir": str(outcome.out_dir), "headline": result.headline,
                "artifacts": [str(a) for a in result.artifacts], "seconds": result.seconds,
                "values": [v._asdict() for v in result.values]}


def _checkpoint(args) -> str:
    """The checkpoint from ``--checkpoint PATH`` or the positional form; with ``--checkpoint`` a
    positional ``key=value`` is an override (argparse fills the optional positional first)."""
    from sharp_unlearn.errors import ConfigError

    if args.checkpoint_option is not None:
        if args.checkpoint is not None:
            if "=" not in args.checkpoint:
                raise ConfigError(f"two checkpoints given ({args.checkpoint!r} and --checkpoint "
                                  f"{args.checkpoint_option!r}); expected one")
            args.overrides = [args.checkpoint, *args.overrides]
        return args.checkpoint_option
    if args.checkpoint is None:
        raise ConfigError("no checkpoint given; expected --checkpoint PATH (or the path as the first argument)")
    return args.checkpoint
