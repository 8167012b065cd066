"""SAM/plain step-time ratio under ZeRO (default stage 2, 2 processes) vs the single-process ratio.

The single-process ratio is measured first in this process with the
project's :class:`~sharp_unlearn.engine.loop.Trainer` on the full global
batch; then ``torchrun`` starts N ranks that time the same model, batch (each
rank its slice) and SAM radius inside a DeepSpeed engine with
:class:`~sharp_unlearn.engine.deepspeed_engine.DeepSpeedTrainer`. In both, the
plain and the SAM step are timed interleaved (alternating which goes first)
after a warm-up, and the ratio of the medians is reported. Target: the ZeRO
ratio within 10 % of the single-process one (SAM under ZeRO adds one norm
all-reduce and one all-gather of the perturbed partitions per step).

    python benchmarks/zero_sam_throughput.py                  # CPU, gloo, 2 ranks, ZeRO-2
    python benchmarks/zero_sam_throughput.py --scale 0.3      # quicker, noisier
    python benchmarks/zero_sam_throughput.py --device cuda --nproc 1 --bf16   # GPU, NCCL

On CPU the clock is each process's CPU time with one thread per process (on a
shared machine wall time mostly measures the neighbours; ``--clock wall``
measures that instead); ranks' medians are averaged. On CUDA it is wall time
between synchronisations (the slowest rank per step). Exit code 1 when the
ratios differ by more than ``--target``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from sharp_unlearn.engine.objective import Batch, Objective, SamSpec
from sharp_unlearn.recipes.distributed import torchrun_command


def ce(model, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch.x), batch.y)


def build(args):
    from sharp_unlearn.models.mlp import MLP

    torch.manual_seed(0)
    return MLP(10, (3, 32, 32), hidden=tuple(args.hidden))


def make_batch(args, rows: int, device) -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(torch.randn(rows, 3, 32, 32, generator=g), torch.randint(0, 10, (rows,), generator=g),
                 torch.arange(rows)).to(device)


def interleaved(step, reps: int, warmup: int, clock, sync) -> dict[str, float]:
    def one(kind: str) -> float:
        sync()
        start = clock()
        step(kind)
        sync()
        return clock() - start

    for _ in range(warmup):
        one("plain")
        one("sam")
    times: dict[str, list[float]] = {"plain": [], "sam": []}
    for i in range(reps):
        for kind in (("plain", "sam") if i % 2 == 0 else ("sam", "plain")):
            times[kind].append(one(kind))
    return {k: statistics.median(v) for k, v in times.items()}


def objectives(args):
    return {"plain": Objective("ce", "train", ce), "sam": Objective("ce", "train", ce, sam=SamSpec(rho=args.rho))}


# ---------------------------------------------------------------- single process
def single_process(args, clock) -> dict[str, float]:
    from sharp_unlearn.engine.loop import Trainer

    device = torch.device(args.device)
    model = build(args).to(device)
    if args.bf16:  # the same arithmetic as the bf16 ZeRO run's forward and backward
        model = model.bfloat16()
    # a tiny lr keeps the weights, so the work per step, the same over the run
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9, weight_decay=5e-4)
    trainer = Trainer(model, optimizer, device=device)
    batch = make_batch(args, args.batch * args.nproc, device)
    if args.bf16:
        batch = Batch(batch.x.bfloat16(), batch.y, batch.index)
    objs = objectives(args)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return interleaved(lambda kind: trainer.step([objs[kind]], {"train": [batch]}), args.reps, args.warmup,
                       clock, sync)


# ---------------------------------------------------------------- one rank under torchrun
def worker(args, clock, out_path: str) -> None:
    import deepspeed

    from sharp_unlearn.engine.deepspeed_engine import DeepSpeedTrainer

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    world = torch.distributed.get_world_size()
    model = build(args)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9, weight_decay=5e-4)
    ds_config = {
        "train_batch_size": args.batch * world, "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bool(args.bf16)}, "steps_per_print": 10**9,
        "zero_optimization": {"stage": args.stage, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000,
                              "stage3_prefetch_bucket_size": 5_000_000,
                              "stage3_param_persistence_threshold": 0},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    trainer = DeepSpeedTrainer(engine, device=device)
    batch = make_batch(args, args.batch * world, device)  # the trainer casts inputs to bf16 when needed
    objs = objectives(args)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    medians = interleaved(lambda kind: trainer.step([objs[kind]], {"train": [batch]}), args.reps, args.warmup,
                          clock, sync)
    packed = torch.tensor([medians["plain"], medians["sam"]], dtype=torch.float64,
                          device=device if device.type == "cuda" else "cpu")
    if args.clock_name == "wall":
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)  # the slowest rank sets the pace
    else:
        torch.distributed.all_reduce(packed)
        packed /= world  # CPU time: the average rank's work
    if torch.distributed.get_rank() == 0:
        Path(out_path).write_text(json.dumps({"plain": float(packed[0]), "sam": float(packed[1]), "world": world,
                                              "partition_numel": trainer.view.partition_numel}))
    torch.distributed.barrier()
    engine.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--nproc", type=int, default=2, help="ranks under ZeRO (default 2)")
    parser.add_argument("--stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--bf16", action="store_true", help="bf16 weights/activations in the ZeRO run (GPU)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024, 1024],
                        help="MLP widths on 3x32x32 inputs (default ~5.2M parameters)")
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch (the single process gets nproc x)")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply --reps")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto")
    parser.add_argument("--target", type=float, default=0.10, help="allowed relative difference of the ratios")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.reps = max(5, int(args.reps * args.scale))
    args.clock_name = "cpu" if args.clock == "cpu" or (args.clock == "auto" and args.device == "cpu") else "wall"
    clock = time.process_time if args.clock_name == "cpu" else time.perf_counter
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False

    if args.worker_out:
        worker(args, clock, args.worker_out)
        return 0

    single = single_process(args, clock)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "zero.json"
        cmd = [*torchrun_command(args.nproc), __file__,
               "--worker-out", str(out), *(argv if argv is not None else sys.argv[1:])]
        env = {**os.environ, "OMP_NUM_THREADS": "1" if args.device == "cpu" else os.environ.get("OMP_NUM_THREADS", "4")}
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL if args.json else None)
        if proc.returncode != 0:
            print(f"the ZeRO run failed (exit {proc.returncode})", file=sys.stderr)
            return 2
        zero = json.loads(out.read_text())
    single_ratio = single["sam"] / single["plain"]
    zero_ratio = zero["sam"] / zero["plain"]
    relative = zero_ratio / single_ratio - 1.0
    params = sum(p.numel() for p in build(args).parameters())
    machine = (f"{platform.machine()}, torch {torch.__version__}, {args.device}, "
               f"{'process CPU' if args.clock_name == 'cpu' else 'wall'} time, "
               f"{'1 thread per process' if args.device == 'cpu' else 'NCCL'}")
    result = {
        "machine": machine, "params": params, "stage": args.stage, "nproc": zero["world"], "bf16": args.bf16,
        "per_rank_batch": args.batch, "reps": args.reps,
        "single_ms": {k: 1e3 * v for k, v in single.items()}, "single_ratio": single_ratio,
        "zero_ms": {k: 1e3 * zero[k] for k in ("plain", "sam")}, "zero_ratio": zero_ratio,
        "relative_difference": relative, "target": args.target,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model: MLP {args.hidden} on 3x32x32 ({params / 1e6:.1f}M parameters), "
              f"global batch {args.batch * zero['world']}, {args.reps} reps; {machine}")
        print(f"single process : plain {result['single_ms']['plain']:8.1f} ms  sam {result['single_ms']['sam']:8.1f} ms"
              f"  ratio {single_ratio:.3f}")
        print(f"ZeRO-{args.stage} x{zero['world']}     : plain {result['zero_ms']['plain']:8.1f} ms  "
              f"sam {result['zero_ms']['sam']:8.1f} ms  ratio {zero_ratio:.3f}")
        print(f"ZeRO ratio / single ratio - 1 = {relative:+.1%} (target within +-{args.target:.0%})")
    return 0 if abs(relative) <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
