"""Held-out memorization throughput: models per minute with 1 and 2 Ray workers, and a
projection of the wall time for CIFAR-100 with K = 2000 models on G GPUs.

One local Ray session (``num_cpus=2``) runs everything, so Ray's start-up is
paid once and both settings share warm worker processes. After a warm-up (one
model per worker: imports, data set), rounds of ``--models`` trainings are run
with 1 and then 2 trainings in flight, alternating which setting goes first;
the throughput of each setting is its models over its wall time, and the
speed-up is the median over adjacent (1-worker, 2-worker) pairs of rounds, so
a burst of load from a neighbour spoils one pair rather than the figure. The
``contention`` figure (in-task time with 2 in flight over 1) says whether the
second core was actually free: on a shared machine wall-clock parallel
speed-up is only meaningful when it is close to 1. Each
training is the real thing (``train_subset_model``: the project's loop, one
intra-op thread, the subset and seed of its model id).

    python benchmarks/memorization_scaling.py            # ~1 minute on 2 idle cores
    python benchmarks/memorization_scaling.py --json
    python benchmarks/memorization_scaling.py --gpu-images-per-second 6000   # your measured GPU rate

The projection (see benchmarks/README.md) is arithmetic on measured numbers:

    t_model      = measured seconds of one CIFAR-100 subset model on one GPU (--cifar-model-seconds),
                   else epochs * p * n_train / R_gpu  (R_gpu: an ASSUMED training images/s per GPU)
    wall(K, G)   = T_start + ceil(K / G) * (t_model + o)

with ``o`` Ray's per-task overhead and ``T_start`` the start-up (Ray + worker
imports + data), both measured here. The trainings are independent, so the
waves are the whole story: no communication between models. Packing c small
models per GPU (``--gpus-per-model 1/c``) divides the waves by c when one
model cannot fill a GPU. The same ResNet-18 step timed on this machine's CPU
shows why a cluster is needed at all.

Exit code 1 when the 2-worker speed-up is below ``--target`` (default 1.7).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

from sharp_unlearn.config import load_config
from sharp_unlearn.recipes.memorization_heldout import HeldoutSettings, _run_ray, heldout_ray_session

CIFAR100_TRAIN = 50_000


def digits_config(args) -> object:
    return load_config([], [
        "output_dir=/tmp/sharp-unlearn-bench", "tracking.enabled=false", "data.label_noise=0.05",
        "data.augment=false", f"model.name={args.model}",
        "model.options={width: 8, feature_dim: 32}" if args.model == "small_cnn" else "model.options={}",
        f"train.epochs={args.epochs}", "optimizer.weight_decay=0",
    ])


def run_round(ray, cfg, ids: list[int], workers: int) -> tuple[float, list[float]]:
    """Wall seconds for the trainings of ``ids`` with ``workers`` in flight, and their in-task seconds."""
    settings = HeldoutSettings(num_models=2, workers=workers, cpus_per_model=1.0)
    start = time.perf_counter()
    outcomes = list(_run_ray(ray, cfg, ids, settings))
    return time.perf_counter() - start, [o.wall_seconds for o in outcomes]


def warm_workers(ray, cfg, workers: int = 2, attempts: int = 10) -> set[int]:
    """Until ``workers`` distinct worker processes have imported torch and built the data
    set: a cold worker in a timed round would charge ~10 s of imports to one setting."""
    from sharp_unlearn.recipes.memorization_heldout import _cached_bundle

    def warm(cfg_dict):
        import torch._dynamo  # noqa: F401

        from sharp_unlearn.config import config_from_dict

        _cached_bundle(config_from_dict(cfg_dict))
        time.sleep(1.0)  # keep this worker busy so the next task goes to another one
        return os.getpid()

    task = ray.remote(num_cpus=1)(warm)
    seen: set[int] = set()
    for _ in range(attempts):
        pids = set(ray.get([task.remote(cfg.to_dict()) for _ in range(workers)]))
        seen |= pids
        if len(pids) == workers:
            break
    return seen


def resnet18_cpu_seconds_per_image(steps: int = 3, batch: int = 64) -> float | None:
    """Measured here: CPU time of one ResNet-18 (CIFAR stem, 100 classes) training step per image,
    through the project's Trainer, one thread."""
    import torch
    from torch.nn import functional as F

    from sharp_unlearn.config import ModelConfig
    from sharp_unlearn.engine.loop import Trainer
    from sharp_unlearn.engine.objective import Batch, Objective
    from sharp_unlearn.models import MODELS, build_model

    if "resnet18" not in MODELS:
        return None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18"), 100, (3, 32, 32))
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    objective = Objective("ce", "train", lambda m, b: F.cross_entropy(m(b.x), b.y))
    data = Batch(torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,)), torch.arange(batch))
    trainer.step([objective], {"train": [data]})  # warm-up
    times = []
    for _ in range(steps):
        start = time.process_time()
        trainer.step([objective], {"train": [data]})
        times.append(time.process_time() - start)
    return statistics.median(times) / batch


def projection(k: int, gpus: list[int], model_seconds: float, overhead_seconds: float,
               start_seconds: float) -> list[dict]:
    """Wall time of K trainings on G GPUs, one training per GPU at a time: the trainings
    run in ceil(K / G) waves, each costing one model plus Ray's per-task overhead."""
    rows = []
    for g in gpus:
        waves = math.ceil(k / g)
        wall = start_seconds + waves * (model_seconds + overhead_seconds)
        rows.append({"gpus": g, "model_minutes": model_seconds / 60, "waves": waves, "wall_hours": wall / 3600})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8, help="trainings per round and setting (default 8)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per setting, alternating order (default 4)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of each digits model (default 20)")
    parser.add_argument("--model", default="small_cnn", choices=("small_cnn", "mlp"))
    parser.add_argument("--target", type=float, default=1.7, help="required 2-worker speed-up (default 1.7)")
    parser.add_argument("--cifar-models", type=int, default=2000, help="K for the projection (default 2000)")
    parser.add_argument("--cifar-epochs", type=int, default=100,
                        help="epochs per CIFAR-100 subset model in the projection (default 100)")
    parser.add_argument("--gpu-images-per-second", type=float, default=5000.0,
                        help="ASSUMED ResNet-18 CIFAR training throughput of one GPU (default 5000 img/s); "
                             "or pass --cifar-model-seconds")
    parser.add_argument("--cifar-model-seconds", type=float, default=None,
                        help="MEASURED seconds of one CIFAR-100 subset model on one GPU (overrides the "
                             "images/s estimate): `sharp-unlearn memorization --models 2 data.name=cifar100 "
                             "model.name=resnet18 --gpus-per-model 1 --json` reports model_seconds_mean")
    parser.add_argument("--gpus", default="1,8,16,32,64", help="cluster sizes to project (default 1,8,16,32,64)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    os.environ.pop("RAY_ADDRESS", None)  # the measurement is about this machine
    cfg = digits_config(args)
    next_id = iter(range(100_000))
    per_setting: dict[int, dict[str, list[float]]] = {1: {"wall": [], "models": [], "task": []},
                                                       2: {"wall": [], "models": [], "task": []}}
    t0 = time.perf_counter()
    with heldout_ray_session(HeldoutSettings(num_models=2, workers=2)) as ray:
        started = time.perf_counter() - t0
        warm_start = time.perf_counter()
        warm_workers(ray, cfg)
        run_round(ray, cfg, [next(next_id) for _ in range(2)], workers=2)
        warm_wall = time.perf_counter() - warm_start
        for r in range(args.rounds):
            for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
                ids = [next(next_id) for _ in range(args.models)]
                wall, task = run_round(ray, cfg, ids, workers)
                per_setting[workers]["wall"].append(wall)
                per_setting[workers]["models"].append(len(ids))
                per_setting[workers]["task"].extend(task)
    mpm = {w: 60.0 * sum(s["models"]) / sum(s["wall"]) for w, s in per_setting.items()}
    # the speed-up of each adjacent (1-worker, 2-worker) pair of rounds, then the median: a burst
    # of load from a neighbour spoils one pair, not the whole figure
    pair_ratios = [w1 / w2 for w1, w2 in zip(per_setting[1]["wall"], per_setting[2]["wall"], strict=True)]
    speedup = statistics.median(pair_ratios)
    efficiency = speedup / 2
    model_seconds = statistics.median(per_setting[1]["task"])
    # in-task time with 2 in flight over 1 in flight: ~1 on idle cores, ~2 when neighbours take the second core
    contention = statistics.median(per_setting[2]["task"]) / model_seconds
    overhead = sum(per_setting[1]["wall"]) / sum(per_setting[1]["models"]) - float(np.mean(per_setting[1]["task"]))
    start_seconds = started + warm_wall  # Ray up + workers importing torch and building the data set

    cpu_per_image = resnet18_cpu_seconds_per_image()
    gpus = [int(g) for g in args.gpus.split(",")]
    cifar_model_seconds = args.cifar_model_seconds or (
        args.cifar_epochs * 0.7 * CIFAR100_TRAIN / args.gpu_images_per_second)
    gpu_rows = projection(args.cifar_models, gpus, cifar_model_seconds, overhead, start_seconds)
    result = {
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version()},
        "workload": {"dataset": "digits", "model": args.model, "epochs": args.epochs,
                     "models_per_round": args.models, "rounds": args.rounds},
        "models_per_minute_1_worker": mpm[1], "models_per_minute_2_workers": mpm[2],
        "speedup": speedup, "speedup_per_pair": pair_ratios, "speedup_overall": mpm[2] / mpm[1],
        "target": args.target, "parallel_efficiency": efficiency,
        "model_seconds_median": model_seconds, "contention": contention, "ray_overhead_seconds_per_model": overhead,
        "start_seconds": start_seconds,
        "projection": {
            "k": args.cifar_models, "epochs": args.cifar_epochs, "subset_fraction": 0.7,
            "model_seconds": cifar_model_seconds,
            "model_seconds_source": "measured (--cifar-model-seconds)" if args.cifar_model_seconds else
            f"assumed {args.gpu_images_per_second:g} img/s per GPU",
            "rows": gpu_rows,
            "resnet18_cpu_ms_per_image_measured": None if cpu_per_image is None else 1000 * cpu_per_image,
            "this_machine_2_cores_years": None if cpu_per_image is None else (
                args.cifar_models * args.cifar_epochs * 0.7 * CIFAR100_TRAIN * cpu_per_image / 2
                / (365 * 86400)),  # both cores busy, no overhead: a lower bound
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"held-out memorization on {args.model}/digits, {args.epochs} epochs per model, "
              f"{args.rounds} x {args.models} models per setting (load average {os.getloadavg()[0]:.1f})")
        print(f"  1 worker : {mpm[1]:7.1f} models/min")
        print(f"  2 workers: {mpm[2]:7.1f} models/min   speed-up {speedup:.2f}x (target {args.target}x; median of "
              f"pairs {', '.join(f'{r:.2f}' for r in pair_ratios)})")
        print(f"  per model {model_seconds:.2f} s in the task, Ray overhead {overhead * 1000:.0f} ms/model, "
              f"start-up {start_seconds:.1f} s, contention {contention:.2f} (in-task time 2 vs 1 in flight; "
              "1.0 = the second core was free)")
        proj = result["projection"]
        print(f"projection: CIFAR-100, K={args.cifar_models}, one model {cifar_model_seconds / 60:.1f} min "
              f"({proj['model_seconds_source']}; {args.cifar_epochs} epochs on 70 % subsets unless measured), "
              f"+ {overhead * 1000:.0f} ms Ray overhead per model, + {start_seconds:.0f} s start-up")
        for row in gpu_rows:
            print(f"  {row['gpus']:4d} GPUs: {row['waves']:5d} waves x {row['model_minutes']:.1f} min "
                  f"= {row['wall_hours']:8.1f} h")
        if cpu_per_image is not None:
            print(f"  (measured here: ResNet-18 step {proj['resnet18_cpu_ms_per_image_measured']:.1f} CPU-ms/image; "
                  f"K={args.cifar_models} on these 2 cores: {proj['this_machine_2_cores_years']:.0f} years)")
    return 0 if speedup >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
