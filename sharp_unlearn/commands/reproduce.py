"""``sharp-unlearn reproduce theory|table|ablation``: the paper's claims, one command each."""
from __future__ import annotations

from sharp_unlearn.commands.base import COMMANDS, Command, add_deterministic_argument, check_output_dir
from sharp_unlearn.errors import ConfigError

# lazy: the sharp_unlearn imports inside the functions below keep `sharp-unlearn --help` fast: cli.py
# imports every command, and the recipes a command runs import torch, and mlflow or ray

TARGETS = ("theory", "table", "ablation", "lm")


@COMMANDS.register("reproduce")
class Reproduce(Command):
    help = ("reproduce the paper's claims: `theory` (signal-noise model), `table` (methods x SGD/SAM) or "
            "`ablation` (project Sharp MinMax -> the released code's, one switch at a time) or `lm` (the "
            "language-model table: methods x AdamW/SAM over seeds)")

    def add_arguments(self, parser):
        parser.add_argument("target", help=f"one of: {', '.join(TARGETS)}")
        parser.add_argument("--output-dir", default=None, help="default: runs/reproduce-<target>")
        parser.add_argument("--seeds", default=None,
                            help="comma-separated seeds (default: theory 0; table, ablation and lm 0,1,2)")
        parser.add_argument("--root", default=None, help="table: a CIFAR root (default: digits)")
        parser.add_argument("--dataset", default=None, help="table: cifar10 or cifar100 when --root is given")
        parser.add_argument("--sweep", action="store_true",
                            help="table: tune every method x optimizer cell (and the paper-code Sharp MinMax) "
                                 "with Ray Tune first, the same trial budget per cell")
        parser.add_argument("--trials", type=int, default=None,
                            help="table --sweep: Ray Tune trials per cell (default 6)")
        parser.add_argument("--epochs", type=int, default=None,
                            help="table --sweep: unlearning epochs of every cell, tuning and tuned grid alike "
                                 "(default: each method's epochs in the spec)")
        parser.add_argument("--methods", default=None, help="table, lm: comma-separated subset of methods")
        parser.add_argument("--workers", type=int, default=None,
                            help="ablation: processes running (seed, pretraining optimizer) slices side by side, "
                                 "one torch thread each (default: the machine's CPUs; 1: in sequence, here)")
        parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
        parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
        add_deterministic_argument(parser)
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="spec overrides")

    def run(self, args):
        if args.target not in TARGETS:
            raise ConfigError(f"reproduce target {args.target!r} is not valid; expected one of: {', '.join(TARGETS)}")
        seeds = None
        if args.seeds:
            try:
                seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
            except ValueError:
                raise ConfigError(f"--seeds={args.seeds!r} is not a comma-separated list of integers") from None
        tracking = {"enabled": not args.no_tracking, **({"uri": args.tracking_uri} if args.tracking_uri else {})}
        if args.deterministic:  # the spec's base config reaches every pretraining and unlearning run
            args.overrides = [*args.overrides, "base.deterministic=true"]
        out = args.output_dir or f"runs/reproduce-{args.target}"
        if args.workers is not None and args.target != "ablation":
            raise ConfigError(f"--workers is not valid with reproduce {args.target}; "
                              "expected it with reproduce ablation")
        check_output_dir(out)
        if args.target == "theory":
            return _theory(args, seeds, tracking, out)
        if args.target == "ablation":
            return _ablation(args, seeds, tracking, out)
        if args.target == "lm":
            return _lm(args, seeds, tracking, out)
        from sharp_unlearn.reproduce.table import run_table

        result = run_table(output_dir=out, seeds=seeds, tracking=tracking, root=args.root, dataset=args.dataset,
                           sweep=args.sweep, methods=args.methods.split(",") if args.methods else None,
                           overrides=args.overrides, quiet=args.quiet, trials=args.trials, epochs=args.epochs)
        if not args.json:
            print(open(result["report_md"]).read())
        return result


def _theory(args, seeds, tracking, out):
    import dataclasses

    from sharp_unlearn.config import parse_override
    from sharp_unlearn.reproduce.theory import TheorySpec, run_theory

    spec = TheorySpec()
    known = {f.name for f in dataclasses.fields(TheorySpec)}
    for text in args.overrides:
        keys, value = parse_override(text)
        if keys[0] not in known:
            raise ConfigError(f"unknown theory key {keys[0]!r}; expected one of: {', '.join(sorted(known))}")
        if keys[0] == "base":
            from sharp_unlearn.config import merge

            node = value
            for key in reversed(keys[1:]):
                node = {key: node}
            spec.base = merge(spec.base, node)
        else:
            setattr(spec, keys[0], value)
    if seeds:
        spec.seeds = seeds
    result = run_theory(spec, output_dir=out, tracking=tracking, quiet=args.quiet)
    if not args.json:
        print(open(result["report"]).read())
        print(f"figure: {result['figure']}  table: {result['table']}")
    return {k: v for k, v in result.items() if k != "rows"}


def _lm(args, seeds, tracking, out):
    for flag, value in (("--root", args.root), ("--dataset", args.dataset), ("--trials", args.trials),
                        ("--epochs", args.epochs), ("--workers", args.workers)):
        if value is not None:
            raise ConfigError(f"{flag} is not valid with reproduce lm; expected --seeds, --methods, --output-dir, "
                              "tracking flags and the LM demo's key=value settings")
    if args.sweep or args.deterministic:
        raise ConfigError("--sweep and --deterministic are not valid with reproduce lm; expected them with "
                          "reproduce table")
    from sharp_unlearn.reproduce.lm_table import run_lm_table

    result = run_lm_table(output_dir=out, seeds=seeds, methods=args.methods.split(",") if args.methods else None,
                          overrides=args.overrides, tracking=tracking, quiet=args.quiet)
    if not args.json:
        print(open(result["report_md"]).read())
    return result


def _ablation(args, seeds, tracking, out):
    for flag, value in (("--root", args.root), ("--dataset", args.dataset), ("--methods", args.methods),
                        ("--trials", args.trials), ("--epochs", args.epochs)):
        if value is not None:
            raise ConfigError(f"{flag} is not valid with reproduce ablation; expected only --seeds, --output-dir, "
                              "tracking flags and spec overrides (the arms are fixed: see docs/reproduction.md)")
    if args.sweep:
        raise ConfigError("--sweep is not valid with reproduce ablation; expected it with reproduce table")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers={args.workers} is not valid; expected an integer >= 1")
    from sharp_unlearn.reproduce.ablation import run_ablation

    result = run_ablation(output_dir=out, seeds=seeds, tracking=tracking, overrides=args.overrides, quiet=args.quiet,
                          workers=args.workers)
    if not args.json:
        print(open(result["report_md"]).read())
    return result
