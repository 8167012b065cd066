"""SAM's cheaper variants (issue #19): step cost and Sharp MinMax's ToW per variant, with a Pareto table.

1. Step cost, side by side in one process: one ``Trainer.step`` of each kind on the
   demo's model (small_cnn width 16, digits-shaped 1x8x8 batches of 64), timed
   interleaved after a warm-up (the kinds rotate which goes first). Each sample is a
   block of 4 consecutive steps, so a reuse variant's sample holds its full and its
   cheap steps in their real proportion. Kinds: an SGD step (one plain objective),
   a NegGrad+/SGD step (two plain objectives, retain and forget), and a Sharp MinMax
   step (retain SAM-min + forget SAM-max with complementary masks) per variant.
   Ratios are medians over the SGD step's and the NegGrad+/SGD step's.
2. Quality: the demo's hard forget set (digits, 5 % flipped labels,
   memorization-high-60 with ``forget.scores=flipped``), an SGD-pretrained model per
   seed (the demo's recipe), Sharp MinMax per variant with the demo's settings, and
   NegGrad+/SGD for reference; ToW mean and 95 % CI over the seeds, wall time of the
   unlearning stage.

Then one table: per variant the step-cost ratios, ToW (mean +- CI), wall seconds, and
whether it is on the Pareto front (no other row is both cheaper per step and higher in
ToW) and inside exact Sharp MinMax's CI.

    OMP_NUM_THREADS=1 python benchmarks/sam_variants.py                # 3 seeds, 40 step samples
    OMP_NUM_THREADS=1 python benchmarks/sam_variants.py --quick        # 1 seed, 8 samples: a smoke run

Process CPU time with one thread, as in ``sam_overhead.py`` (wall time on a shared
machine mostly measures the neighbours); the unlearning stage's wall time is what
``run_unlearning`` reports.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time

import torch

from sharp_unlearn.config import MethodConfig, ModelConfig, OptimizerConfig, merge
from sharp_unlearn.engine.loop import Trainer
from sharp_unlearn.engine.objective import Batch, Objective
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.markdown import markdown_table
from sharp_unlearn.methods import METHODS
from sharp_unlearn.methods.base import scaled
from sharp_unlearn.models import build_model
from sharp_unlearn.optim.saliency import complement
from sharp_unlearn.recipes.grid import load_spec
from sharp_unlearn.recipes.pretrain import train_from_scratch
from sharp_unlearn.recipes.unlearn import load_pretrained, run_unlearning, unlearn_config
from sharp_unlearn.stats import mean_ci95
from sharp_unlearn.validation import config_from_dict

#: variant name -> (optimizer keys, method keys) on top of the demo's Sharp MinMax
VARIANTS: dict[str, tuple[dict, dict]] = {
    "exact": ({}, {}),
    "every=2": ({"sam_every": 2}, {}),
    "every=4": ({"sam_every": 4}, {}),
    "fraction=0.1 random": ({"sam_fraction": 0.1}, {}),
    "fraction=0.1 saliency": ({"sam_fraction": 0.1, "sam_subset": "saliency"}, {}),
    "sides=forget": ({}, {"sam_sides": "forget"}),
    "sides=retain": ({}, {"sam_sides": "retain"}),
    "sides=forget, every=4": ({"sam_every": 4}, {"sam_sides": "forget"}),
}
BLOCK = 4  # steps per timed sample: a multiple of every `sam_every` above
BASELINE = "NegGrad+/SGD"


# ---------------------------------------------------------------- 1. step cost
def step_costs(samples: int, warmup: int, alpha: float, mask_fraction: float) -> dict[str, float]:
    """Median CPU seconds per step, per kind (``sgd``, the baseline, each variant)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig("small_cnn", {"width": 16, "feature_dim": 64}), 10, (1, 8, 8))
    # one optimizer for every kind and a tiny lr: the same base-step cost and the same kernels' work throughout
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
    g = torch.Generator().manual_seed(1)

    def batch():
        return Batch(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g), torch.arange(64))

    batches = {"retain": [batch()], "forget": [batch()], "train": [batch()]}
    # a fixed random mask of the demo's size: the step's cost does not depend on which entries it holds
    mask = {n: (torch.rand(p.shape, generator=g) < mask_fraction).float() for n, p in model.named_parameters()}
    kinds: dict[str, list[Objective]] = {
        "sgd": [Objective("ce", "train", cross_entropy)],
        BASELINE: [Objective("retain", "retain", scaled(cross_entropy, alpha)),
                   Objective("forget", "forget", scaled(cross_entropy, -(1 - alpha)))],
    }
    for name, (opt_keys, method_keys) in VARIANTS.items():
        method = METHODS.get("sharp_minmax")(MethodConfig(name="sharp_minmax", alpha=alpha, **method_keys),
                                             OptimizerConfig(name="sgd", **opt_keys), None)
        method.mask, method.outside = mask, complement(mask)
        kinds[name] = method.objectives()
    trainers = {kind: Trainer(model, optimizer) for kind in kinds}

    def one(kind: str) -> float:
        start = time.process_time()
        for _ in range(BLOCK):
            trainers[kind].step(kinds[kind], batches)
        return (time.process_time() - start) / BLOCK

    names = list(kinds)
    for _ in range(warmup):
        for kind in names:
            one(kind)
    times: dict[str, list[float]] = {kind: [] for kind in names}
    for i in range(samples):
        shift = i % len(names)  # rotate which kind goes first
        for kind in names[shift:] + names[:shift]:
            times[kind].append(one(kind))
    return {kind: statistics.median(values) for kind, values in times.items()}


# ---------------------------------------------------------------- 2. ToW on the demo's hard forget set
def quality(seeds: list[int], out: str) -> dict[str, dict[str, list[float]]]:
    """Per row (each variant, and the baseline): ToW and unlearning wall seconds, one entry per seed."""
    spec = load_spec(None, "demo_digits")
    tracking = {"enabled": False}
    minmax = dict(spec["methods"]["sharp_minmax"])
    minmax.pop("optimizers", None)
    neggrad = dict(spec["methods"]["neggrad"])
    results: dict[str, dict[str, list[float]]] = {name: {"tow": [], "wall": []} for name in [*VARIANTS, BASELINE]}
    for seed in seeds:
        pre_cfg = config_from_dict(merge(spec["base"], {"seed": seed, "output_dir": out, "tracking": tracking,
                                                        "optimizer": {"name": "sgd"}}))
        checkpoint = train_from_scratch(pre_cfg, quiet=True).checkpoint
        pretrained = load_pretrained(checkpoint)
        split = reference = None
        rows = [(BASELINE, {"name": "sgd"}, {"name": "neggrad", **neggrad})]
        rows += [(name, {"name": "sam", **opt_keys}, {"name": "sharp_minmax", **minmax, **method_keys})
                 for name, (opt_keys, method_keys) in VARIANTS.items()]
        for name, optimizer, method in rows:
            tree = merge(unlearn_config(pretrained), copy.deepcopy(spec["unlearn"]))
            tree = merge(tree, {"optimizer": optimizer, "forget": spec["forget"], "method": method,
                                "output_dir": out, "tracking": tracking})
            outcome = run_unlearning(config_from_dict(tree), checkpoint, pretrained=pretrained, split=split,
                                     reference=reference, quiet=True, save_model=False)
            split, reference = outcome.split, outcome.reference
            results[name]["tow"].append(outcome.metrics["tow"])
            results[name]["wall"].append(outcome.metrics["wall_seconds"])
            print(f"seed {seed} {name:<24} ToW {outcome.metrics['tow']:.4f}  "
                  f"{outcome.metrics['wall_seconds']:.2f} s", file=sys.stderr, flush=True)
    return results


def table(costs: dict[str, float], results: dict[str, dict[str, list[float]]]) -> list[dict]:
    rows = []
    exact_tow, exact_ci = mean_ci95(results["exact"]["tow"])
    for name in [BASELINE, *VARIANTS]:
        tow, ci = mean_ci95(results[name]["tow"])
        rows.append({"variant": name, "step_vs_sgd": costs[name] / costs["sgd"],
                     "step_vs_neggrad_sgd": costs[name] / costs[BASELINE], "tow": tow,
                     "tow_ci95": ci, "wall_s": statistics.mean(results[name]["wall"]),
                     "in_exact_ci": None if exact_ci is None else abs(tow - exact_tow) <= exact_ci})
    for row in rows:
        row["pareto"] = not any(other["step_vs_sgd"] < row["step_vs_sgd"] and other["tow"] > row["tow"]
                                for other in rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=40, help="timed blocks of steps per kind")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 seed and 8 samples: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.samples, args.warmup = 1, 8, 1
    torch.set_num_threads(1)
    spec = load_spec(None, "demo_digits")
    minmax = spec["methods"]["sharp_minmax"]
    costs = step_costs(args.samples, args.warmup, float(minmax["alpha"]), float(minmax["mask_fraction"]))
    with tempfile.TemporaryDirectory() as out:
        results = quality(list(range(args.seeds)), out)
    rows = table(costs, results)
    print(f"step cost: process CPU time, 1 thread, median of {args.samples} blocks of {BLOCK} steps "
          f"(SGD step {1e3 * costs['sgd']:.2f} ms, NegGrad+/SGD step {1e3 * costs[BASELINE]:.2f} ms); "
          f"ToW over {args.seeds} seed(s) on digits memorization-high-60 (flipped), SGD-pretrained")
    print(markdown_table(["variant", "step_vs_sgd", "step_vs_neggrad_sgd", "tow", "tow_ci95", "wall_s",
                          "in_exact_ci", "pareto"], rows,
                         cell=lambda v, c: "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)))
    cheap = [r["variant"] for r in rows if r["variant"] not in (BASELINE, "exact")
             and r["step_vs_neggrad_sgd"] <= 1.3 and r["in_exact_ci"]]
    print(f"variants at <= 1.3x a NegGrad+/SGD step with ToW inside exact Sharp MinMax's 95 % CI: "
          f"{', '.join(cheap) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
