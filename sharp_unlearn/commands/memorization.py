"""``sharp-unlearn memorization``: memorization scores for any registered data set.

Held-out estimate (Feldman & Zhang 2020): K models on random subsets, trained
as Ray tasks (a local Ray, or a cluster with ``--address``), resumable; or,
with ``--proxies-only``, cheap proxies from one training run. The score
table (``index``, ``score``, ...) feeds forget-set selection directly:
``forget.kind=memorization forget.scores=<run dir>/scores.parquet``.
"""
from __future__ import annotations

from sharp_unlearn.commands.base import COMMANDS, Command, add_config_arguments, config_from_args
from sharp_unlearn.commands.console import print_metrics

# lazy: the sharp_unlearn imports inside the functions below keep `sharp-unlearn --help` fast: cli.py
# imports every command, and the recipes a command runs import torch, and mlflow or ray

PROXY_CHOICES = ("loss", "confidence", "learning_speed")


def _proxy_list(text: str) -> tuple[str, ...]:
    import argparse

    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if text.strip() == "all":
        return PROXY_CHOICES
    bad = [k for k in kinds if k not in PROXY_CHOICES]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'all' or a comma list of {', '.join(PROXY_CHOICES)}")
    return kinds


@COMMANDS.register("memorization")
class Memorization(Command):
    help = "compute memorization scores (held-out estimate over K subset models as Ray tasks, or proxies)"

    def add_arguments(self, parser):
        add_config_arguments(parser)
        parser.add_argument("--models", "-K", type=int, default=100, metavar="K",
                            help="number of subset models (default 100; Feldman & Zhang used 2000 on CIFAR-100)")
        parser.add_argument("--subset-fraction", type=float, default=0.7, metavar="P",
                            help="share of the training set each model sees (default 0.7)")
        parser.add_argument("--workers", type=int, default=None,
                            help="trainings at once (default: what the Ray cluster fits)")
        parser.add_argument("--cpus-per-model", type=float, default=1.0, help="Ray CPUs per training (default 1)")
        parser.add_argument("--gpus-per-model", type=float, default=0.0,
                            help="Ray GPUs per training, fractions pack several on one GPU (default 0)")
        parser.add_argument("--address", default=None,
                            help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray for this run)")
        parser.add_argument("--executor", choices=("ray", "serial"), default="ray",
                            help="'serial' trains in this process, without Ray (debugging, tiny runs)")
        parser.add_argument("--influence", action="store_true",
                            help="also write the top-k training examples influencing each test example")
        parser.add_argument("--influence-top-k", type=int, default=10, metavar="K")
        parser.add_argument("--proxies", type=_proxy_list, default=(), metavar="LIST",
                            help="also compute proxies (e.g. 'loss,learning_speed' or 'all') and report their "
                                 "Spearman agreement with the held-out scores")
        parser.add_argument("--proxies-only", action="store_true",
                            help="only the proxies (one training run; for data too large for K trainings)")
        parser.add_argument("--out", default=None, metavar="DIR",
                            help="run directory (default: <output_dir>/memorization/<recipe>-p<P>)")
        parser.add_argument("--no-resume", action="store_true", help="retrain models already on disk")

    def run(self, args):
        from sharp_unlearn.recipes.memorization import compute_memorization, proxy_table
        from sharp_unlearn.recipes.memorization_heldout import HeldoutSettings

        cfg = config_from_args(args)
        if args.proxies_only:
            path, summary = proxy_table(cfg, args.proxies or PROXY_CHOICES, run_dir=args.out, quiet=args.quiet)
            result = {"scores": str(path), **summary}
            if not args.json:
                print_metrics(f"memorization proxies {cfg.data.name}/{cfg.model.name}", result)
            return result
        settings = HeldoutSettings(
            num_models=args.models, subset_fraction=args.subset_fraction, workers=args.workers,
            cpus_per_model=args.cpus_per_model, gpus_per_model=args.gpus_per_model, address=args.address,
            executor=args.executor, influence=args.influence, influence_top_k=args.influence_top_k,
            resume=not args.no_resume)
        outcome = compute_memorization(cfg, settings, proxies=tuple(args.proxies), run_dir=args.out,
                                       quiet=args.quiet)
        result = {"scores": str(outcome.scores_path), **outcome.summary}
        if outcome.influence_path is not None:
            result["influence"] = str(outcome.influence_path)
        if not args.json:
            print_metrics(f"memorization {cfg.data.name}/{cfg.model.name} K={settings.num_models}", result)
        return result
