"""``sharp-unlearn convert``: write any registered data set as Parquet shards."""
from __future__ import annotations

from sharp_unlearn.commands.base import COMMANDS, Command, add_config_arguments, config_from_args
from sharp_unlearn.commands.console import print_rows

# lazy: the sharp_unlearn imports inside the functions below keep `sharp-unlearn --help` fast: cli.py
# imports every command, and the recipes a command runs import torch, and mlflow or ray


@COMMANDS.register("convert")
class Convert(Command):
    help = "convert a data set (data.name=..., data.root=...) to Parquet shards {train,val,test}-*.parquet"

    def add_arguments(self, parser):
        add_config_arguments(parser)
        parser.add_argument("--out", "-o", required=True, metavar="DIR", help="folder for the shards")
        parser.add_argument("--shard-size", type=int, default=10_000, metavar="N", help="rows per shard")
        parser.add_argument("--format", choices=("array", "png"), default="array",
                            help="image column: fixed-size arrays (exact for any data) or PNG bytes "
                                 "(raw uint8 pixels, or values that are exactly k/255)")
        parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")

    def run(self, args):
        from sharp_unlearn.data.parquet import convert_to_parquet

        cfg = config_from_args(args)
        summary = convert_to_parquet(cfg.data, args.out, args.shard_size, image_format=args.format,
                                     seed=cfg.seed, overwrite=args.overwrite)
        if not args.json:
            rows = [{"split": split, "rows": summary["rows"][split], "shards": summary["shards"][split]}
                    for split in summary["rows"]]
            print_rows(f"{summary['source']} -> {summary['out_dir']} ({summary['format']})",
                       ["split", "rows", "shards"], rows)
        return summary
