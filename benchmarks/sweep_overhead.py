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

``--sharded``: every trial is a DeepSpeed ZeRO-2 job of 2 CPU workers (Ray Train, gloo; Sharp
MinMax on an MLP, per-epoch ToW measured by the workers). Two timings of the same N trials:

- ``direct``: each sharded run launched from this process, one after another (Ray Train, no Tune);
- ``tune``: the same trials through Ray Tune (trial process of 0.01 CPU relaying per-epoch
  reports with the sharded checkpoint; one trial at a time, as its 2 workers fill the 2 CPUs).

Both arms start the same Train runs (worker processes, process group, DeepSpeed engine) per
trial, so what differs is Tune's part. The run folders are removed between arms, so no arm
finds another's finished runs. Printed ratio::

    overhead per trial after start-up = (tune - Tune start-up) / direct - 1     (target <= 15 %)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path


def build_spec(tmp: Path, trials: int, epochs: int, width: int, sharded: bool = False):
    from sharp_unlearn.tuning import parse_sweep

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
    if sharded:  # ZeRO-2 on 2 CPU workers, 2 x 32 = the global batch of 64; an MLP (no BatchNorm)
        raw["base"]["model"] = {"name": "mlp", "options": {"hidden": [16 * width]}}
        raw["unlearn"].update(data={"batch_size": 32},
                              distributed={"backend": "deepspeed", "zero_stage": 2, "num_workers": 2})
        raw["method"] = {"name": "sharp_minmax", "epochs": epochs, "alpha": 0.95, "mask_fraction": 0.5}
        raw["resources"] = {"cpu": 0.99}  # per worker: 2 x 0.99 + the trial's 0.01 = 2 CPUs
    return parse_sweep(raw, tracking={"enabled": False}, storage=str(tmp / "storage"))


def time_sequential(spec, inputs) -> float:
    import torch

    from sharp_unlearn.tuning import LocalSession, run_trial

    torch.set_num_threads(1)
    start = time.perf_counter()
    for dim_value in spec.dims[0].values:
        run_trial(inputs, {spec.dims[0].key: dim_value}, LocalSession())
    return time.perf_counter() - start


def trial_times(inputs, since: float) -> tuple[float, float, float]:
    """From the trials' own ledger: when the first trial of a run started, and the median
    start-to-done time of its trials (the work itself: with 2 in flight on 2 free cores it
    equals the 1-in-flight time; when it grows, the second core was busy with other jobs)."""
    import json
    import statistics

    events = [json.loads(line) for file in Path(inputs.ledger_dir).glob("*.jsonl")
              for line in file.read_text().splitlines() if line.strip()]
    events = [e for e in events if e["time"] >= since]
    starts = {e["trial_id"]: e["time"] for e in events if e["event"] == "start"}
    done = {e["trial_id"]: e["time"] for e in events if e["event"] == "done"}
    durations = [done[t] - starts[t] for t in done if t in starts]
    first = min(starts.values()) if starts else since
    waits = [e["report_seconds"] for e in events if e["event"] == "epoch" and "report_seconds" in e]
    return (first, statistics.median(durations) if durations else float("nan"),
            statistics.median(waits) if waits else float("nan"))


def time_ray(spec, inputs, concurrent: int, name: str,
             tracking_uri: str | None = None) -> tuple[float, float, float, float]:
    """(wall time of the Tune run, of which start-up: Tuner set-up and worker processes until the first
    trial works, median seconds a trial took from start to done, median seconds a trial waited in
    one per-epoch ``tune.report``)."""
    from dataclasses import replace

    from sharp_unlearn.tuning.runner import fit_tuner, meta_dir

    spec = replace(spec, name=name, max_concurrent=concurrent)
    parent_id = experiment_id = None
    if tracking_uri:
        from sharp_unlearn.tracking import get_or_create_experiment
        from sharp_unlearn.tuning.runs import mlflow_client

        client = mlflow_client(tracking_uri)
        experiment_id = get_or_create_experiment(client, "sweep-overhead", tracking_uri)
        parent_id = client.create_run(experiment_id, run_name=name, tags={"kind": "sweep"}).info.run_id
    start, wall_start = time.perf_counter(), time.time()
    results = fit_tuner(spec, inputs, resume=False, quiet=True, parent_id=parent_id, uri=tracking_uri,
                        experiment_id=experiment_id, context={}, map_file=meta_dir(spec) / "mlflow_runs.json")
    elapsed = time.perf_counter() - start
    bad = [r for r in results if r.error or int(r.metrics.get("epoch", 0)) != spec.max_epochs()]
    if bad:
        raise SystemExit(f"{name}: {len(bad)} trial(s) did not run all epochs: {bad[0].error}")
    first, in_trial, report_wait = trial_times(inputs, wall_start)
    return elapsed, first - wall_start, in_trial, report_wait


def sharded_main(args) -> int:
    """``--sharded``: direct sharded runs vs the same through Tune, interleaved rounds, fastest counts."""
    import shutil

    from sharp_unlearn.ray_cluster import ray_session
    from sharp_unlearn.tuning import prepare_inputs

    load_before = os.getloadavg()[0]
    arms = ("direct", "tune")
    wall: dict[str, list[float]] = {arm: [] for arm in arms}
    warmup: dict[str, list[float]] = {arm: [] for arm in arms}
    report_wait: list[float] = []
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-sharded-") as tmp:
        tmp = Path(tmp)
        spec = build_spec(tmp, args.trials, args.epochs, args.width, sharded=True)
        inputs, _ = prepare_inputs(spec, quiet=True)
        runs = Path(spec.output_dir) / "sweep-unlearn"
        start = time.perf_counter()
        ray_open = contextlib.ExitStack()  # the local Ray the commands start, closed below
        ray_open.enter_context(ray_session(num_cpus=2, log_to_driver=False))
        startup = time.perf_counter() - start
        try:
            # warm-up, one trial: DeepSpeed's first import and op builds are paid here
            from sharp_unlearn.tuning import LocalSession, run_trial

            run_trial(inputs, {spec.dims[0].key: spec.dims[0].values[0]}, LocalSession())
            for round_no in range(args.repeats):
                shutil.rmtree(runs, ignore_errors=True)
                wall["direct"].append(time_sequential(spec, inputs))
                warmup["direct"].append(0.0)
                shutil.rmtree(runs, ignore_errors=True)
                elapsed, first, _, wait = time_ray(spec, inputs, 1, f"tune-{round_no}")
                wall["tune"].append(elapsed)
                warmup["tune"].append(first)
                report_wait.append(wait)
        finally:
            ray_open.close()
    best = {arm: min(range(len(values)), key=values.__getitem__) for arm, values in wall.items()}
    direct = wall["direct"][best["direct"]]
    tune_total = wall["tune"][best["tune"]]
    tune_steady = tune_total - warmup["tune"][best["tune"]]
    print(f"sharded sweep overhead: {args.trials} trials x {args.epochs} epochs, each a ZeRO-2 job of 2 CPU "
          f"workers (digits, MLP, Sharp MinMax, per-epoch ToW), {direct / args.trials:.2f} s per trial launched "
          f"directly; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for arm in arms:
        rounds = ", ".join(f"{v:.1f}" for v in wall[arm])
        extra = (f"  of which {tune_total - tune_steady:.1f} s start-up (Tuner + the first trial's process)"
                 if arm == "tune" else "")
        print(f"  {arm:<7}: {wall[arm][best[arm]]:7.2f} s  (rounds: {rounds}){extra}")
    print(f"  ray.init (once per sweep, in no figure above): {startup:.1f} s")
    print(f"RATIO sharded trial through Tune vs launched directly, whole run: {100 * (tune_total / direct - 1):+.1f} %")
    print(f"RATIO sharded trial through Tune vs launched directly, per trial after start-up: "
          f"{100 * (tune_steady / direct - 1):+.1f} %  ({(tune_steady - direct) / args.trials:+.2f} s per trial; "
          f"target <= +15 %)")
    print(f"  median wait in one per-epoch tune.report (sharded checkpoint linked + persisted): "
          f"{1000 * report_wait[best['tune']]:.0f} ms")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=15, help="unlearning epochs per trial")
    parser.add_argument("--width", type=int, default=8, help="small_cnn width")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of (sequential, ray x1, ray x2), interleaved; the fastest of each counts")
    parser.add_argument("--mlflow", action="store_true", help="also time ray x2 with MLflow child runs")
    parser.add_argument("--sharded", action="store_true",
                        help="trials are DeepSpeed ZeRO-2 jobs of 2 CPU workers: direct vs through Tune")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.sharded:
        return sharded_main(args)

    from sharp_unlearn.ray_cluster import ray_session
    from sharp_unlearn.tuning import prepare_inputs

    load_before = os.getloadavg()[0]
    arms = ["sequential", "ray x1", "ray x2"] + (["ray x2 + mlflow"] if args.mlflow else [])
    wall: dict[str, list[float]] = {arm: [] for arm in arms}
    warmup: dict[str, list[float]] = {arm: [] for arm in arms}
    in_trial: dict[str, list[float]] = {arm: [] for arm in arms}
    report_wait: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as tmp:
        tmp = Path(tmp)
        spec = build_spec(tmp, args.trials, args.epochs, args.width)
        inputs, _ = prepare_inputs(spec, quiet=True)
        time_sequential(spec, inputs)  # warm-up: imports and first-call costs are paid before timing

        start = time.perf_counter()
        ray_open = contextlib.ExitStack()  # the local Ray the commands start, closed below
        ray_open.enter_context(ray_session(num_cpus=2, log_to_driver=False))
        startup = time.perf_counter() - start
        try:
            # interleaved rounds: load from other processes hits every arm alike; the fastest round counts
            for round_no in range(args.repeats):
                wall["sequential"].append(time_sequential(spec, inputs))
                warmup["sequential"].append(0.0)
                for arm, concurrent, uri in (("ray x1", 1, None), ("ray x2", 2, None),
                                             ("ray x2 + mlflow", 2, f"sqlite:///{tmp / 'mlflow.db'}")):
                    if arm in wall:
                        elapsed, first, median, wait = time_ray(spec, inputs, concurrent,
                                                          f"{arm.replace(' ', '-')}-{round_no}",
                                                          uri if arm.endswith("mlflow") else None)
                        wall[arm].append(elapsed)
                        warmup[arm].append(first)
                        in_trial[arm].append(median)
                        report_wait[arm].append(wait)
        finally:
            ray_open.close()

    best = {arm: min(range(len(values)), key=values.__getitem__) for arm, values in wall.items()}
    total = {arm: wall[arm][i] for arm, i in best.items()}
    steady = {arm: wall[arm][i] - warmup[arm][i] for arm, i in best.items()}
    sequential = total["sequential"]
    print(f"sweep overhead: {args.trials} trials x {args.epochs} epochs (digits, small_cnn width {args.width}, "
          f"NegGrad+, per-epoch ToW + checkpoint), {sequential / args.trials:.2f} s of work per trial; "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for arm in arms:
        rounds = ", ".join(f"{v:.1f}" for v in wall[arm])
        extra = (f"  of which {total[arm] - steady[arm]:.1f} s start-up (Tuner + worker processes until the "
                 f"first trial works)") if arm != "sequential" else ""
        print(f"  {arm:<16}: {total[arm]:7.2f} s  (rounds: {rounds}){extra}")
    print(f"  ray.init (once per sweep, in no figure above): {startup:.1f} s")
    ray_1, ray_2 = total["ray x1"], total["ray x2"]
    print(f"RATIO ray overhead at equal concurrency, whole run (ray x1 / sequential - 1): "
          f"{100 * (ray_1 / sequential - 1):+.1f} %  (target <= +15 %)")
    print(f"RATIO ray overhead at equal concurrency, after start-up (per-trial cost): "
          f"{100 * (steady['ray x1'] / sequential - 1):+.1f} %  "
          f"({(steady['ray x1'] - sequential) / args.trials:+.2f} s per trial)")
    print(f"RATIO speed-up with 2 concurrent trials on 2 CPUs (sequential / ray x2): x{sequential / ray_2:.2f} "
          f"(after start-up: x{sequential / steady['ray x2']:.2f}; vs ray x1: x{ray_1 / ray_2:.2f}; target ~x2)")
    waits = ", ".join(f"{arm} {1000 * report_wait[arm][best[arm]]:.0f} ms" for arm in arms if arm != "sequential")
    print(f"  median wait in one per-epoch tune.report (checkpoint persisted, driver round trip): {waits}")
    contention = in_trial["ray x2"][best["ray x2"]] / in_trial["ray x1"][best["ray x1"]]
    print(f"  contention (median trial time with 2 in flight / with 1): {contention:.2f}  "
          f"(~1.0: the second core was free and the speed-up means something; ~2: it was busy)")
    if "ray x2 + mlflow" in total:
        print(f"RATIO MLflow child runs (ray x2 + mlflow / ray x2 - 1): "
              f"{100 * (total['ray x2 + mlflow'] / ray_2 - 1):+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
