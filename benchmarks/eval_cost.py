"""Cost of a full evaluation relative to one training epoch, measured side by side in one run.

"Full evaluation" = ``accuracy,tow,mia,entanglement,sharpness`` (everything
``sharp-unlearn evaluate`` runs by default, with the retrained reference, so
ToW and the calibrated MIA are included), with the default caps of
:class:`sharp_unlearn.metrics.EvalOptions`. The loss landscape and UMAP are
timed separately when asked (``--with-landscape``, ``--with-umap``) and are
not part of the ratio. One epoch = one pass of the engine's training loop
(``Trainer.run_phase``, SGD, cross-entropy) over the same training set; the
ratio uses the faster of ``--epochs`` timed epochs after an untimed warm-up.
Target: ratio <= 2. Times are process CPU time with one thread unless
``--clock wall`` / ``--threads`` say otherwise.

The evaluation's caps are fixed sizes, so the ratio falls as the data set
grows; the default is a CIFAR-10-shaped synthetic set (3x32x32, 10 classes)
at CIFAR-10's size, where the ratio is meaningful. ``--data digits`` shows
the other end: a 1257-example set where an epoch takes a fraction of a second.

    python benchmarks/eval_cost.py                       # CIFAR-10-sized, small_cnn width 8
    python benchmarks/eval_cost.py --train-size 10000    # quicker
    python benchmarks/eval_cost.py --data digits
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch.utils.data import Subset

from sharp_unlearn.config import ModelConfig, OptimizerConfig
from sharp_unlearn.data import IndexedTensorDataset
from sharp_unlearn.engine.loop import Trainer, make_loader
from sharp_unlearn.engine.objective import Objective, Phase
from sharp_unlearn.evaluation import run_metrics
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.metrics import EvalContext, EvalOptions
from sharp_unlearn.models import build_model
from sharp_unlearn.optim.factory import build_base_optimizer

FULL = ["accuracy", "tow", "mia", "entanglement", "sharpness"]
TARGET = 2.0


def cifar_like(n_train: int, n_test: int, n_val: int, seed: int = 0):
    """Ten smooth class templates plus per-example noise: learnable, CIFAR-10-shaped."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.nn.functional.avg_pool2d(torch.randn(10, 3, 32, 32, generator=g), 5, 1, 2) * 3

    def make(n):
        y = torch.randint(0, 10, (n,), generator=g)
        x = templates[y] + torch.randn(n, 3, 32, 32, generator=g)
        return IndexedTensorDataset(x, y)

    return make(n_train), make(n_test), make(n_val), 10, (3, 32, 32)


def digits():
    from sharp_unlearn.config import DataConfig
    from sharp_unlearn.data import build_dataset

    b = build_dataset(DataConfig(name="digits", augment=False), 0)
    return b.train, b.test, b.val, b.num_classes, b.input_shape


#: process CPU time by default: on a shared machine wall time mostly measures the other jobs
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def time_epoch(trainer: Trainer, train, batch_size: int, epoch: int, clock) -> float:
    phase = Phase("train", [Objective("ce", "train", cross_entropy)])
    streams = {"train": lambda pass_no: make_loader(train, batch_size, shuffle=True, seed=0,
                                                    epoch=epoch * 1000 + pass_no)}
    start = clock()
    trainer.run_phase(phase, streams)
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["cifar-like", "digits"], default="cifar-like")
    parser.add_argument("--train-size", type=int, default=45000)
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--forget-fraction", type=float, default=0.1)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--width", type=int, default=8,
                        help="small_cnn width (8 keeps a CIFAR-10-sized epoch under a minute on 2 CPU cores)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after one untimed warm-up)")
    parser.add_argument("--with-landscape", action="store_true")
    parser.add_argument("--with-umap", action="store_true")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: process CPU time (default; robust on a shared machine), wall: elapsed time")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()  # read now: UMAP's numba may change it later
    clock = CLOCKS[args.clock]
    torch.manual_seed(0)
    if args.data == "digits":
        train, test, val, classes, shape = digits()
    else:
        train, test, val, classes, shape = cifar_like(args.train_size, args.test_size, args.val_size)
    options = {"width": args.width} if args.model == "small_cnn" else {}
    model = build_model(ModelConfig(name=args.model, options=options), classes, shape)
    trainer = Trainer(model, build_base_optimizer(model.parameters(), OptimizerConfig(lr=0.02)))

    time_epoch(trainer, train, args.batch_size, 0, clock)  # warm-up: allocator, first-call costs
    reference = copy.deepcopy(model)  # a different model of the same architecture, as the retrained reference
    epoch_seconds = [time_epoch(trainer, train, args.batch_size, e + 1, clock) for e in range(args.epochs)]
    epoch = min(epoch_seconds)

    n = len(train)
    forget = np.sort(np.random.default_rng(0).choice(n, size=max(1, int(args.forget_fraction * n)), replace=False))
    retain = np.setdiff1d(np.arange(n), forget)
    splits = {"retain": Subset(train, retain.tolist()), "forget": Subset(train, forget.tolist()), "test": test,
              "val": val}
    opts = EvalOptions()
    ctx = EvalContext(model, splits, reference=reference, options=opts)
    start = clock()
    result = run_metrics(ctx, FULL)
    full = clock() - start
    extra = {}
    for flag, name in ((args.with_landscape, "landscape"), (args.with_umap, "umap")):
        if flag:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                ctx.out_dir = __import__("pathlib").Path(tmp)
                start = clock()
                run_metrics(ctx, [name])
                extra[name] = clock() - start

    ratio = full / epoch
    print(f"data: {args.data} train={n} (retain {len(retain)}, forget {len(forget)}) test={len(test)} "
          f"val={len(val)}; model {args.model}; threads {threads}; clock {args.clock}")
    print(f"caps: mia_max_shadow={opts.mia_max_shadow} wasserstein_max_per_set={opts.wasserstein_max_per_set} "
          f"sharpness_samples={opts.sharpness_samples} hessian_iters<={opts.hessian_iters} (tol {opts.hessian_tol})")
    print(f"one training epoch (SGD, batch {args.batch_size}): {epoch:.2f} s  (timed epochs: "
          + ", ".join(f"{s:.2f}" for s in epoch_seconds) + ")")
    per_metric = result.cpu_seconds if args.clock == "cpu" else result.seconds
    print("full evaluation: " + f"{full:.2f} s  = " + " + ".join(f"{k} {v:.2f}" for k, v in per_metric.items()))
    hvp = {s: d["hvp_products"] for s, d in result.details["sharpness"]["splits"].items()}
    print(f"  Hessian-vector products per split: {hvp}")
    for name, seconds in extra.items():
        print(f"{name} (not in the ratio): {seconds:.2f} s = {seconds / epoch:.2f} epochs")
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"RATIO full evaluation / epoch = {ratio:.2f}  (target <= {TARGET:g}: {verdict})")


if __name__ == "__main__":
    main()
