"""``sharp-unlearn config show``: the resolved config (YAML) of a command line, without running it."""
from __future__ import annotations

from sharp_unlearn.commands.base import COMMANDS, Command, add_config_arguments
from sharp_unlearn.errors import ConfigError

# lazy: the sharp_unlearn imports inside the functions below keep `sharp-unlearn --help` fast: cli.py
# imports every command, and the recipes a command runs import torch, and mlflow or ray

#: commands whose config is an ExperimentConfig built from --config files and key=value overrides
RUN_COMMANDS = ("pretrain", "unlearn", "retrain", "mask", "evaluate", "memorization", "convert")
#: commands driven by a grid spec (overrides address the spec: base.train.epochs=...)
GRID_COMMANDS = ("demo", "reproduce")
#: commands that start from a checkpoint's own config
FROM_CHECKPOINT = ("unlearn", "retrain", "mask", "evaluate")


@COMMANDS.register("config")
class ConfigShow(Command):
    help = "print the resolved config (YAML) of a command line without running anything"

    def add_arguments(self, parser):
        parser.add_argument("action", choices=("show",), help="show: print the resolved config")
        # dest "target": "command" is the sub-command's own name (error lines say "sharp-unlearn config")
        parser.add_argument("--command", dest="target", default="pretrain", metavar="COMMAND",
                            choices=RUN_COMMANDS + GRID_COMMANDS,
                            help=f"the command whose config to resolve: {', '.join(RUN_COMMANDS + GRID_COMMANDS)} "
                                 "(default: pretrain)")
        parser.add_argument("--checkpoint", default=None, metavar="PATH",
                            help="unlearn/retrain/mask/evaluate: the checkpoint whose config is the base "
                                 "(without it: the defaults)")
        parser.add_argument("--spec", default=None, metavar="FILE",
                            help="demo/reproduce: the grid spec (default: the packaged one)")
        add_config_arguments(parser)

    def run(self, args):
        import yaml

        overrides = list(args.overrides)
        if args.target in GRID_COMMANDS:
            if args.config:
                raise ConfigError(f"--command {args.target} takes its spec with --spec, not --config")
            tree = _grid_spec(args, overrides)
        else:
            if args.spec:
                raise ConfigError(f"--spec is for --command demo or reproduce, not {args.target}")
            if args.tracking_uri:
                overrides.append(f"tracking.uri={args.tracking_uri}")
            if args.no_tracking:
                overrides.append("tracking.enabled=false")
            if args.deterministic:
                overrides.append("deterministic=true")
            tree = _run_config(args, overrides).to_dict()
        if not args.json:
            print(yaml.safe_dump(_plain(tree), sort_keys=False), end="")
        return tree


def _run_config(args, overrides):
    from sharp_unlearn.validation import load_config

    base = None
    if args.checkpoint is not None:
        if args.target not in FROM_CHECKPOINT:
            raise ConfigError(f"--checkpoint is for --command {'/'.join(FROM_CHECKPOINT)}, not {args.target}")
        base = _checkpoint_base(args.checkpoint, args.target)
    return load_config(args.config, overrides, base=base)


def _checkpoint_base(path: str, command: str) -> dict:
    import copy
    from pathlib import Path

    from sharp_unlearn.engine.checkpoint import load_checkpoint

    if not Path(path).is_file():
        raise ConfigError(f"--checkpoint {path!r} is not a file; expected a checkpoint from pretrain or unlearn")
    state = load_checkpoint(path)
    if "config" not in state:
        raise ConfigError(f"checkpoint {path!r} carries no config; expected a sharp-unlearn checkpoint")
    tree = copy.deepcopy(state["config"])
    if command != "evaluate":
        # as unlearning runs start: the model's sections, not its forget set, method or tracking
        for key in ("forget", "method", "tracking"):
            tree.pop(key, None)
    return tree


def _grid_spec(args, overrides):
    from sharp_unlearn.recipes.grid import load_spec
    from sharp_unlearn.validation import config_from_dict

    if args.deterministic:
        overrides.append("base.deterministic=true")
    default = "demo_digits" if args.target == "demo" else "reproduce_digits"
    spec = load_spec(args.spec, default, overrides)
    tracking = {"enabled": not args.no_tracking, **({"uri": args.tracking_uri} if args.tracking_uri else {})}
    spec["base"] = {**spec["base"], "tracking": {**spec["base"].get("tracking", {}), **tracking}}
    config_from_dict(spec["base"])  # a bad base key or value fails here as it would in the run
    return spec


def _plain(value):
    """YAML-safe: tuples (optimizer.betas) as lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
