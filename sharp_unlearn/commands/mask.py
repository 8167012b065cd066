"""``sharp-unlearn mask``: saliency masks (largest |grad L_F|, or smallest with method.mask_order=smallest)
for salun and sharp_minmax."""
from __future__ import annotations

from sharp_unlearn.commands.base import COMMANDS, Command, add_config_arguments, config_from_args
from sharp_unlearn.commands.console import print_rows

# lazy: the sharp_unlearn imports inside the functions below keep `sharp-unlearn --help` fast: cli.py
# imports every command, and the recipes a command runs import torch, and mlflow or ray


@COMMANDS.register("mask")
class Mask(Command):
    help = ("compute saliency masks for a forget set (largest |grad| of the forget loss), one file per "
            "fraction (method.mask_order=smallest keeps the smallest); use one with method.mask_path=FILE")

    def add_arguments(self, parser):
        parser.add_argument("--checkpoint", required=True, help="pretrained checkpoint (from `pretrain`)")
        parser.add_argument("--fractions", default=None, metavar="F1,F2,...",
                            help="mask fractions in (0, 1), e.g. 0.1,0.3,0.5 (default: method.mask_fraction, "
                                 "else 0.5)")
        parser.add_argument("--out", default=None, metavar="DIR",
                            help="output directory (default: <output_dir>/masks/<data>-<model>-<ckpt>-<split>)")
        add_config_arguments(parser)

    def run(self, args):
        from sharp_unlearn.model_store import resolve_checkpoint
        from sharp_unlearn.recipes.mask import make_masks, parse_fractions
        from sharp_unlearn.recipes.unlearn import load_pretrained, unlearn_config

        pretrained = load_pretrained(resolve_checkpoint(args.checkpoint, args.tracking_uri))
        cfg = config_from_args(args, base=unlearn_config(pretrained))
        fractions = parse_fractions(args.fractions, cfg.method.mask_fraction if cfg.method else 0.5)
        outcome = make_masks(cfg, pretrained, fractions, out_dir=args.out, quiet=args.quiet)
        rows = [{"fraction": f, "selected": outcome.selected[f], "of": outcome.total_entries,
                 "file": str(path)} for f, path in outcome.paths.items()]
        if not args.json:
            print_rows(f"masks for {outcome.forget_set} (split {outcome.split_hash}, "
                       f"{outcome.forget_size} forget examples)", ["fraction", "selected", "of", "file"], rows)
        return {"masks": {f"{f:g}": str(p) for f, p in outcome.paths.items()}, "split_hash": outcome.split_hash,
                "forget_set": outcome.forget_set, "out_dir": str(outcome.out_dir), "run_id": outcome.run_id,
                "selected": {f"{f:g}": n for f, n in outcome.selected.items()},
                "total_entries": outcome.total_entries}
