"""``sharp-unlearn demo``: the main job on the embedded default (digits, offline, CPU)."""
from __future__ import annotations

from sharp_unlearn.commands.base import COMMANDS, Command, add_deterministic_argument

# lazy: the sharp_unlearn imports inside the functions below keep `sharp-unlearn --help` fast: cli.py
# imports every command, and the recipes a command runs import torch, and mlflow or ray

#: evaluation metrics left out of the terminal table (they are in MLflow, the Parquet and the Markdown table)
CONSOLE_HIDDEN_METRICS = ("entanglement_variance_bounded", "entanglement_variance_classwise_weighted",
                          "entanglement_variance_classwise_weighted_bounded",
                          "entanglement_wasserstein_classwise_weighted")


@COMMANDS.register("demo")
class Demo(Command):
    help = "pretrain with SGD and SAM on digits, unlearn with every method, print the ToW table"

    def add_arguments(self, parser):
        parser.add_argument("--task", choices=("images", "lm"), default="images",
                            help="images: the digits grid (default); lm: language-model unlearning on "
                                 "fictitious people (tiny GPT, forget quality / model utility table)")
        parser.add_argument("--spec", default=None, help="demo spec YAML (default: packaged demo_digits)")
        parser.add_argument("--output-dir", default="runs", help="where checkpoints and tables go")
        parser.add_argument("--methods", default=None, help="comma-separated subset of methods")
        parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlruns.db)")
        parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
        parser.add_argument("--no-evaluate", action="store_true", help="skip MIA / entanglement / sharpness")
        add_deterministic_argument(parser)
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="spec overrides, e.g. base.train.epochs=20 forget.size=40")

    def run(self, args):
        if args.task == "lm":
            return self.run_lm(args)
        from sharp_unlearn.recipes.demo import run_demo

        tracking = {"enabled": not args.no_tracking}
        if args.tracking_uri:
            tracking["uri"] = args.tracking_uri
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        overrides = [*args.overrides, *(["base.deterministic=true"] if args.deterministic else [])]
        result = run_demo(args.spec, overrides, output_dir=args.output_dir, tracking=tracking,
                          methods=methods, quiet=args.quiet, evaluate=not args.no_evaluate)
        if not args.json:
            print_demo(result)
        return {"rows": result.rows, "results": str(result.results_path), "evaluation": result.evaluation}

    def run_lm(self, args):
        from sharp_unlearn.commands.console import print_rows
        from sharp_unlearn.recipes.lm import DEFAULT_METHODS, TABLE_COLUMNS, run_lm_demo, settings_from_overrides

        tracking = {"enabled": not args.no_tracking, **({"uri": args.tracking_uri} if args.tracking_uri else {})}
        settings = settings_from_overrides(args.overrides)
        methods = DEFAULT_METHODS
        if args.methods:
            methods = {m.strip(): DEFAULT_METHODS.get(m.strip(), {}) for m in args.methods.split(",") if m.strip()}
        quiet = args.quiet or args.json
        result = run_lm_demo(settings, methods=methods, output_dir=args.output_dir, tracking=tracking,
                             log=(lambda *_: None) if quiet else print)
        if not args.json:
            print_rows("sharp-unlearn demo --task lm: unlearning fictitious people (retrain = the reference)",
                       TABLE_COLUMNS, result.rows)
            print(f"table:   {result.markdown_path}")
        return {"rows": result.rows, "table": str(result.markdown_path)}


def print_demo(result) -> None:
    """The demo's terminal output: the ToW table, the evaluation table, where the files went."""
    from sharp_unlearn.commands.console import print_rows
    from sharp_unlearn.recipes.demo import TABLE_COLUMNS

    print_rows("sharp-unlearn demo: ToW against the retrained reference (digits, memorization-high)",
               TABLE_COLUMNS, result.rows)
    if result.evaluation:
        # the paper-scale entanglement scores stay in MLflow and the result files: four more columns
        # would fold every number of this table at 100 columns
        cols = list(dict.fromkeys(k for row in result.evaluation for k in row
                                  if k not in ("seed", "level", *CONSOLE_HIDDEN_METRICS)))
        print_rows("membership inference (forget set), retain/forget entanglement, sharpness", cols,
                   result.evaluation)
    print(f"results: {result.results_path}")
    print(f"table:   {result.markdown_path}")
