"""Unlearning wall time / retraining wall time, at the ToW reached, measured side by side in one run.

Pretrains on digits with 5 % flipped labels (the demo's recipe), forgets the
60 memorized (flipped) examples with each listed method, and retrains from
scratch on the retain set (no cache: ``use_cache=False``) in the same process,
alternating the order, so both see the same machine. Prints per method the
ToW against the retrained reference and ``retrain seconds / unlearn seconds``:
the wall time of the training stage each reports (``run_stage``), so evaluation
passes and checkpoint loading count for neither side.

    OMP_NUM_THREADS=1 python benchmarks/unlearn_vs_retrain.py
    OMP_NUM_THREADS=1 python benchmarks/unlearn_vs_retrain.py --methods neggrad,scrub --repeats 3
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch

from sharp_unlearn.config import config_from_dict, merge
from sharp_unlearn.recipes.grid import load_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="neggrad,scrub,sharp_minmax,finetune")
    parser.add_argument("--pretrain-optimizer", default="sam", choices=["sgd", "sam"])
    parser.add_argument("--unlearn-optimizers", default="sgd,sam",
                        help="unlearning optimizers tried per method (Sharp MinMax always uses its SAM pair)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from sharp_unlearn.recipes.pretrain import train_from_scratch
    from sharp_unlearn.recipes.unlearn import load_pretrained, run_unlearning, unlearn_config

    spec = load_spec(None, "demo_digits")
    with tempfile.TemporaryDirectory() as out:
        tracking = {"enabled": False}
        pre_cfg = config_from_dict(merge(spec["base"], {"output_dir": out, "tracking": tracking,
                                                        "optimizer": {"name": args.pretrain_optimizer}}))
        outcome = train_from_scratch(pre_cfg, quiet=True)
        pretrained = load_pretrained(outcome.checkpoint)
        split = None
        rows = []
        cells = []
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            over = dict(spec["methods"].get(method, {}))
            optimizers = over.pop("optimizers", None) or args.unlearn_optimizers.split(",")
            opt_over = dict(over.pop("optimizer", None) or {})
            for opt in optimizers:
                tree = merge(unlearn_config(pretrained), copy.deepcopy(spec["unlearn"]))
                tree = merge(tree, {"optimizer": {**opt_over, "name": opt}, "forget": spec["forget"],
                                    "method": {"name": method, **over}, "output_dir": out, "tracking": tracking})
                cells.append((method, config_from_dict(tree)))
        for method, cfg in cells:
            unlearn_s, retrain_s, tows = [], [], []
            for rep in range(args.repeats):
                order = ("unlearn", "retrain") if rep % 2 == 0 else ("retrain", "unlearn")
                for what in order:
                    if what == "unlearn":
                        result = run_unlearning(cfg, outcome.checkpoint, pretrained=pretrained, split=split,
                                                quiet=True, save_model=False)
                        split = result.split
                        unlearn_s.append(result.metrics["wall_seconds"])
                        tows.append(result.metrics["tow"])
                    elif split is not None:  # the split is known after the first unlearning run
                        retrained = train_from_scratch(pre_cfg, pretrained.bundle, train_indices=split.retain_positions,
                                                       split_hash=split.split_hash, kind="retrain-bench", quiet=True,
                                                       use_cache=False)
                        retrain_s.append(retrained.wall_seconds)
            u, r = statistics.median(unlearn_s), statistics.median(retrain_s)
            rows.append((method, cfg.optimizer.tag, statistics.mean(tows), u, r, r / u))
        print(f"digits, memorization-high-60 (flipped labels), pretrain {args.pretrain_optimizer}, "
              f"training-stage wall time, median of {args.repeats}")
        print(f"{'method':<14}{'opt':<6}{'ToW':>7}{'unlearn s':>11}{'retrain s':>11}{'retrain/unlearn':>17}")
        for method, opt, tow, u, r, ratio in rows:
            print(f"{method:<14}{opt:<6}{tow:>7.3f}{u:>11.2f}{r:>11.2f}{ratio:>16.1f}x")
        print("(retrain = the full pretraining recipe on the retain set, trained anew each repeat)")


if __name__ == "__main__":
    main()
