"""``sharp-unlearn pretrain``: train a model with SGD, SAM or ASAM."""
from __future__ import annotations

from sharp_unlearn.commands.base import COMMANDS, Command, add_address_argument, add_config_arguments, config_from_args
from sharp_unlearn.commands.console import print_metrics

# lazy: the sharp_unlearn imports inside the functions below keep `sharp-unlearn --help` fast: cli.py
# imports every command, and the recipes a command runs import torch, and mlflow or ray


@COMMANDS.register("pretrain")
class Pretrain(Command):
    help = "pretrain a model (optimizer.name=sgd|adam|adamw|sam|asam)"

    def add_arguments(self, parser):
        add_config_arguments(parser)
        parser.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
        add_address_argument(parser)

    def run(self, args):
        from sharp_unlearn.recipes.pretrain import train_from_scratch

        cfg = config_from_args(args)
        outcome = train_from_scratch(cfg, quiet=args.quiet, resume=not args.no_resume, use_cache=False)
        result = {"checkpoint": str(outcome.checkpoint), "run_id": outcome.run_id, **outcome.metrics}
        if not args.json:
            print_metrics(f"pretrain {cfg.data.name}/{cfg.model.name}/{cfg.optimizer.tag}", result)
        return result
