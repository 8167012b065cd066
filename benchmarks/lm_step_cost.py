"""Language-model unlearning costs: SAM step / AdamW step on the demo's tiny GPT, and (``--demo``) each
demo method's wall time against the retrained reference's.

One step is ``Trainer.step`` of the engine with the answer-only cross-entropy objective, with and
without ``SamSpec(rho=0.05)``, same model, batch and AdamW; the two kinds alternate after warm-up and
the ratio is the median SAM step over the median AdamW step, in process CPU time on one thread.

    OMP_NUM_THREADS=1 python benchmarks/lm_step_cost.py [--reps 60] [--n-embd 32] [--demo]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from sharp_unlearn.engine.loop import Trainer
from sharp_unlearn.engine.objective import Batch, Objective, SamSpec
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.optim.factory import build_base_optimizer
from sharp_unlearn.recipes.lm import LMDemoSettings, build_setup, optimizer_config, run_lm_demo


def step_times(settings: LMDemoSettings, reps: int) -> tuple[float, float]:
    setup = build_setup(settings)
    model = setup.initial
    trainer = Trainer(model, build_base_optimizer(model.parameters(), optimizer_config("adamw", 1e-3, 0.05)))
    n = settings.batch_size
    batch = Batch(setup.train.input_ids[:n], setup.train.labels[:n], torch.arange(n))
    plain = Objective("train", "train", cross_entropy)
    sam = Objective("train", "train", cross_entropy, sam=SamSpec(rho=0.05))
    times: dict[str, list[float]] = {"adamw": [], "sam": []}
    for rep in range(reps + 5):
        order = [("adamw", plain), ("sam", sam)] if rep % 2 == 0 else [("sam", sam), ("adamw", plain)]
        for name, objective in order:
            start = time.process_time()
            trainer.step([objective], {"train": [batch]})
            if rep >= 5:  # warm-up pairs are not counted
                times[name].append(time.process_time() - start)
    return statistics.median(times["adamw"]), statistics.median(times["sam"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--n-embd", type=int, default=32)
    parser.add_argument("--demo", action="store_true", help="also run the LM demo and print wall-time ratios")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = LMDemoSettings(n_embd=args.n_embd, threads=1)
    adamw, sam = step_times(settings, args.reps)
    print(f"tiny GPT n_embd={args.n_embd} batch={settings.batch_size}: AdamW step {1000 * adamw:.2f} ms, "
          f"SAM step {1000 * sam:.2f} ms, ratio {sam / adamw:.2f}")
    if args.demo:
        result = run_lm_demo(settings, tracking={"enabled": False}, output_dir="/tmp/lm_step_cost_demo",
                             log=lambda *_: None)
        reference = next(r for r in result.rows if r["method"] == "retrain")["wall_seconds"]
        for row in result.rows:
            print(f"{row['method']:<13} {row['unlearn_opt']:<24} {row['wall_seconds']:7.2f} s  "
                  f"{row['wall_seconds'] / reference:6.3f} of the reference")


if __name__ == "__main__":
    main()
