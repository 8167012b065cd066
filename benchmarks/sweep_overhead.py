"""Ray Tune overhead and speed-up for small sweep trials, measured side by side in one run.

Three timings of the same N unlearning trials (digits, tiny CNN, NegGrad+,
FIFO so every trial runs all its epochs, every trial reporting per-epoch ToW
with a checkpoint, as in a real sweep):

- ``sequential``: the trials one after another in this process (no Ray);
- ``ray x1``: through Ray Tune, one trial at a time (equal concurrency);
- ``ray x2``: through Ray Tune, two trials at a time on two CPUs.

The shared inputs (pretrained model, forget split, retrained reference) are
prepared once, outside all timings. Ray's start-up is timed separately (once
per sweep). Printed ratios::

    overhead  = ray x1 / sequential - 1     (target <= 15 %)
    speed-up  = sequential / ray x2          (target ~ 2 on 2 free cores)

Run: ``OMP_NUM_THREADS=1 python benchmarks/sweep_overhead.py [--trials 8] [--epochs 15] [--repeats 2]``
(``--mlflow`` adds a fourth timing, ``ray x2`` with every trial logged as an MLflow child run). The
arms run in interleaved rounds and the fastest round of each counts, so load from other processes
on a shared machine disturbs the ratios less; the load average is printed alongside.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def build_spec(tmp: Path, trials: int, epochs: int, width: int):
    from sharp_unlearn.tune import parse_sweep

    alphas = [round(0.9 + 0.09 * i / max(1, trials - 1), 4) for i in range(trials)]
    raw = {
        "name": "overhead", "stage": "unlearn", "output_dir": str(tmp / "runs"),
        "base": {"seed": 0, "data": {"name": "digits", "label_noise": 0.05, "batch_size": 64, "augment": False},
                 "model": {"name": "small_cnn", "options": {"width": width, "feature_dim": 4 * width}},
                 "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
                 "train": {"epochs": 10, "schedule": "cosine"}},
        "forget": {"kind": "memorization", "level": "high", "size": 30, "scores": "flipped"},
        "unlearn": {"optimizer": {"lr": 0.01, "weight_decay": 0.0}, "train": {"schedule": "constant"}},
        "method": {"name": "neggrad", "epochs": epochs, "alpha": 0.95},
        "search": {"method.alpha": {"grid": alphas}},
        "scheduler": "fifo", "num_samples": 1, "resources": {"cpu": 1}, "max_failures": 0,
    }
    return parse_sweep(raw, tracking={"enabled": False}, storage=str(tmp / "storage"))


def time_sequential(spec, inputs) -> float:
    import torch

    from sharp_unlearn.tune import LocalSession, run_trial

    torch.set_num_threads(1)
    start = time.perf_counter()
    for dim_value in spec.dims[0].values:
        run_trial(inputs, {spec.dims[0].key: dim_value}, LocalSession())
    return time.perf_counter() - start


def time_ray(spec, inputs, concurrent: int, name: str, tracking_uri: str | None = None) -> float:
    from dataclasses import replace

    from sharp_unlearn.tuning.runner import _fit, meta_dir

    spec = replace(spec, name=name, max_concurrent=concurrent)
    parent_id = experiment_id = None
    if tracking_uri:
        from sharp_unlearn.tracking import get_or_create_experiment
        from sharp_unlearn.tuning.runs import mlflow_client

        client = mlflow_client(tracking_uri)
        experiment_id = get_or_create_experiment(client, "sweep-overhead", tracking_uri)
        parent_id = client.create_run(experiment_id, run_name=name, tags={"kind": "sweep"}).info.run_id
    start = time.perf_counter()
    results = _fit(spec, inputs, resume=False, quiet=True, parent_id=parent_id, uri=tracking_uri,
                   experiment_id=experiment_id, context={}, map_file=meta_dir(spec) / "mlflow_runs.json")
    elapsed = time.perf_counter() - start
    bad = [r for r in results if r.error or int(r.metrics.get("epoch", 0)) != spec.max_epochs()]
    if bad:
        raise SystemExit(f"{name}: {len(bad)} trial(s) did not run all epochs: {bad[0].error}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=15, help="unlearning epochs per trial")
    parser.add_argument("--width", type=int, default=8, help="small_cnn width")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of (sequential, ray x1, ray x2), interleaved; the fastest of each counts")
    parser.add_argument("--mlflow", action="store_true", help="also time ray x2 with MLflow child runs")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray

    from sharp_unlearn.tune import prepare_inputs

    load_before = os.getloadavg()[0]
    timings: dict[str, list[float]] = {"sequential": [], "ray x1": [], "ray x2": [], "ray x2 + mlflow": []}
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as tmp:
        tmp = Path(tmp)
        spec = build_spec(tmp, args.trials, args.epochs, args.width)
        inputs, _ = prepare_inputs(spec, quiet=True)
        time_sequential(spec, inputs)  # warm-up: first-call costs (allocator, kernels) are not Ray's fault

        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - start
        try:
            # interleaved rounds: load from other processes hits every arm alike; the fastest round counts
            for round_no in range(args.repeats):
                timings["sequential"].append(time_sequential(spec, inputs))
                timings["ray x1"].append(time_ray(spec, inputs, 1, f"x1-{round_no}"))
                timings["ray x2"].append(time_ray(spec, inputs, 2, f"x2-{round_no}"))
                if args.mlflow:
                    timings["ray x2 + mlflow"].append(
                        time_ray(spec, inputs, 2, f"x2-mlflow-{round_no}", f"sqlite:///{tmp / 'mlflow.db'}"))
        finally:
            ray.shutdown()

    best = {name: min(values) for name, values in timings.items() if values}
    sequential, ray_1, ray_2 = best["sequential"], best["ray x1"], best["ray x2"]
    per_trial = sequential / args.trials

    def runs(name: str) -> str:
        return ", ".join(f"{v:.1f}" for v in timings[name])

    print(f"sweep overhead: {args.trials} trials x {args.epochs} epochs (digits, small_cnn width {args.width}, "
          f"NegGrad+, per-epoch ToW + checkpoint), {per_trial:.2f} s of work per trial; "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  sequential (one process) : {sequential:7.2f} s   (rounds: {runs('sequential')})")
    print(f"  ray tune, 1 at a time    : {ray_1:7.2f} s   (rounds: {runs('ray x1')})")
    print(f"  ray tune, 2 at a time    : {ray_2:7.2f} s   (rounds: {runs('ray x2')})")
    if "ray x2 + mlflow" in best:
        print(f"  ray tune, 2 + MLflow runs: {best['ray x2 + mlflow']:7.2f} s   (rounds: {runs('ray x2 + mlflow')})")
    print(f"  ray start-up (once per sweep, not included): {startup:.1f} s")
    print(f"RATIO ray overhead at equal concurrency (ray x1 / sequential - 1): {100 * (ray_1 / sequential - 1):+.1f} %"
          f"  ({(ray_1 - sequential) / args.trials:+.2f} s per trial; target <= +15 %)")
    print(f"RATIO speed-up with 2 concurrent trials on 2 CPUs (sequential / ray x2): x{sequential / ray_2:.2f}"
          f"  (x{ray_1 / ray_2:.2f} vs ray x1; target ~x2)")
    if "ray x2 + mlflow" in best:
        print(f"RATIO MLflow child runs (ray x2 + mlflow / ray x2 - 1): "
              f"{100 * (best['ray x2 + mlflow'] / ray_2 - 1):+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
