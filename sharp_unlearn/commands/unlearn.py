"""``sharp-unlearn unlearn`` and ``sharp-unlearn retrain``."""
from __future__ import annotations

from sharp_unlearn.commands.base import COMMANDS, Command, add_address_argument, add_config_arguments, config_from_args
from sharp_unlearn.commands.console import print_rows

# lazy: the sharp_unlearn imports inside the functions below keep `sharp-unlearn --help` fast: cli.py
# imports every command, and the recipes a command runs import torch, and mlflow or ray


def _load(args):
    from sharp_unlearn.errors import ConfigError
    from sharp_unlearn.model_store import resolve_checkpoint
    from sharp_unlearn.recipes.imported import import_checkpoint
    from sharp_unlearn.recipes.unlearn import load_pretrained, unlearn_config

    path = resolve_checkpoint(args.checkpoint, args.tracking_uri)
    try:
        pretrained = load_pretrained(path)
    except ConfigError:
        # a state dict saved outside this tool: the command line declares its model, data and recipe
        imported = import_checkpoint(path, config_from_args(args))
        if imported is None:
            raise
        pretrained = load_pretrained(imported)
    cfg = config_from_args(args, base=unlearn_config(pretrained))
    return pretrained, cfg


@COMMANDS.register("unlearn")
class Unlearn(Command):
    help = "unlearn a forget set from a pretrained checkpoint (method.name=..., optimizer.name=...)"

    def add_arguments(self, parser):
        parser.add_argument("--checkpoint", required=True,
                            help="pretrained checkpoint (from `pretrain`): a file, runs:/<run id>/model or "
                                 "models:/<name>/<version>; or a state dict saved outside this tool, with "
                                 "its model.name=..., data and pretraining recipe given as overrides")
        parser.add_argument("--register", default=None, metavar="NAME",
                            help="register the unlearned model in MLflow's model registry as a new version of "
                                 "NAME, with lineage tags (needs tracking)")
        add_config_arguments(parser)
        add_address_argument(parser)

    def run(self, args):
        from sharp_unlearn.errors import ConfigError
        from sharp_unlearn.model_store import check_model_name, register_model
        from sharp_unlearn.recipes.unlearn import run_unlearning

        if args.register is not None:  # refused before anything is loaded or trained
            check_model_name(args.register)
        pretrained, cfg = _load(args)
        if args.register is not None:
            if not cfg.tracking.enabled or not cfg.tracking.log_models:
                raise ConfigError(f"--register {args.register!r} needs tracking with logged models; drop "
                                  "--no-tracking / tracking.enabled=false / tracking.log_models=false")
        outcome = run_unlearning(cfg, pretrained.path, quiet=args.quiet, pretrained=pretrained)
        registered = None
        if args.register is not None and outcome.run_id is not None:
            version = register_model(outcome.run_id, args.register, cfg.tracking.uri)
            registered = {"name": args.register, "version": version, "uri": f"models:/{args.register}/{version}"}
            if not args.json:
                print(f"registered: {registered['uri']}")
        rows = [
            {"model": "original", **outcome.original_metrics},
            {"model": "retrain (reference)", **outcome.reference.metrics, "tow": 1.0},
            {"model": f"{outcome.method} / {outcome.optimizer_tag}", **outcome.metrics},
        ]
        if not args.json:
            print_rows(f"unlearn {outcome.split.label} (split {outcome.split.split_hash})",
                       ["model", "retain_acc", "forget_acc", "test_acc", "tow", "wall_seconds"], rows)
        return {"checkpoint": str(outcome.checkpoint), "run_id": outcome.run_id,
                "reference_checkpoint": str(outcome.reference.checkpoint),
                "results": str(outcome.results_path), "split_hash": outcome.split.split_hash,
                "metrics": outcome.metrics, "reference_metrics": outcome.reference.metrics,
                "original_metrics": outcome.original_metrics, "registered": registered}


@COMMANDS.register("retrain")
class Retrain(Command):
    help = "train (or reuse from cache) the retrained reference for a forget set"

    def add_arguments(self, parser):
        parser.add_argument("--checkpoint", required=True,
                            help="pretrained checkpoint whose recipe to reuse (a file, runs:/<run id>/model or "
                                 "models:/<name>/<version>)")
        add_config_arguments(parser)
        add_address_argument(parser)

    def run(self, args):
        from sharp_unlearn.errors import ConfigError
        from sharp_unlearn.recipes.memorization import select_forget_set
        from sharp_unlearn.recipes.unlearn import get_reference

        pretrained, cfg = _load(args)
        if cfg.forget is None:
            raise ConfigError("retrain needs a forget set: set forget.kind and forget.size (or forget.classes)")
        model = pretrained.model("cpu")
        split = select_forget_set(cfg.forget, pretrained.bundle, pretrained.cfg.seed, model=model,
                                  run_cfg=pretrained.cfg)
        reference = get_reference(pretrained, split, quiet=args.quiet, run_cfg=cfg)
        if not args.json:
            print_rows(f"retrain reference {split.label} ({'cached' if reference.cached else 'trained'})",
                       ["retain_acc", "forget_acc", "test_acc", "wall_seconds"], [reference.metrics])
        return {"checkpoint": str(reference.checkpoint), "cached": reference.cached, "run_id": reference.run_id,
                "split_hash": split.split_hash, "metrics": reference.metrics}
