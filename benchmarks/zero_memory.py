"""Per-rank parameter + gradient + optimizer-state bytes at ZeRO stages 0-3, and what SAM adds.

``torchrun`` starts N ranks (default 2, gloo, CPU); each builds the same
model (default ViT-S on 3x32x32: 21.3M parameters in 152 tensors; ``--model
mlp --hidden ...`` for a wide MLP), wraps it in a DeepSpeed engine at every stage
in turn (SGD with momentum, fp32) and, during a training step, counts the
bytes this rank holds:

* ``params``: forward weights plus fp32 master copies (when separate),
* ``grads``: the reduced gradient pieces the optimizer will read (and any
  full-size gradient buffers the parameters still point to),
* ``optim``: the optimizer's state (momentum),

each storage counted once, and ``live``: every tensor storage reachable in
the process minus what was there before the model (includes DeepSpeed's
communication buckets). Ratios are to stage 0 (the unsharded run: every rank
holds everything). Target: stage 3 within 1.2x of 1/N.

SAM: the same counts inside a SAM step, right after the weights were
perturbed (the pass-1 gradient's pieces, the perturbation and any stash are
all alive then), minus the same count right after pass 1's backward. The
extra is reported in units of this rank's partition (fp32 bytes of the
pieces it owns); target: at most 1 for SAM-min (lamb=1) and SAM-max.

    python benchmarks/zero_memory.py                                 # 2 ranks, ViT-S (21.3M)
    python benchmarks/zero_memory.py --model mlp --hidden 1024 1024  # smaller and quicker

DeepSpeed partitions at parameter granularity for gradients at stages 1/2
(a rank keeps the full gradient of every tensor its partition touches), so a
model made of a few huge tensors shows little gain there; ViT-S's 152 tensors
show the intended one.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F

from sharp_unlearn.engine.objective import Batch, Objective, SamSpec
from sharp_unlearn.recipes.distributed import torchrun_command


def ce(model, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch.x), batch.y)


def storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if storage.nbytes() == 0 or t.device.type == "meta":
        return None
    return storage.data_ptr(), storage.nbytes()


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python objects."""
    import warnings

    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on some lazily-imported modules' proxies warns
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        key = storage_key(obj)
        if key is not None:
            seen[key[0]] = max(seen.get(key[0], 0), key[1])
    return sum(seen.values())


def categorized(trainer) -> dict[str, int]:
    """params / grads / optim bytes this rank holds, each storage counted once (first category wins)."""
    engine, view = trainer.engine, trainer.view
    claimed: dict[int, str] = {}
    sizes = {"params": 0, "grads": 0, "optim": 0}

    def claim(t, kind):
        if t is None:
            return
        key = storage_key(t)
        if key is None or key[0] in claimed:
            return
        claimed[key[0]] = kind
        sizes[kind] += key[1]

    stage = view.stage
    for _, p in trainer.named_params:
        claim(p.ds_tensor if stage == 3 else p.data, "params")
    for s in view.shards:
        claim(s.master, "params")
    for g in view.grad_views():
        claim(g, "grads")
    for _, p in trainer.named_params:  # full-size gradients some stages keep on the parameters
        claim(p.grad, "grads")
        claim(getattr(p, "grad_accum", None), "grads")
    base = engine.optimizer if stage == 0 else engine.optimizer.optimizer
    for state in base.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                claim(value, "optim")
    return sizes


def measure_stage(args, stage: int, baseline: int) -> dict:
    import deepspeed

    from sharp_unlearn.config import ModelConfig
    from sharp_unlearn.engine.deepspeed_engine import DeepSpeedTrainer
    from sharp_unlearn.models import build_model

    world = torch.distributed.get_world_size()
    torch.manual_seed(0)
    options = {"hidden": list(args.hidden)} if args.model == "mlp" else json.loads(args.options)
    # a model source (timm:, torchvision:, ...) gets the 3x32x32 batch resized to the size it declares
    model = build_model(ModelConfig(args.model, options), 10, (3, 32, 32))
    numel = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
    ds_config = {
        "train_batch_size": args.batch * world, "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": args.bucket, "allgather_bucket_size": args.bucket,
                              "stage3_prefetch_bucket_size": args.bucket,
                              "stage3_param_persistence_threshold": 0},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    del model, optimizer
    points: dict[str, tuple[int, dict]] = {}
    trainer = DeepSpeedTrainer(engine)

    def probe(point: str) -> None:
        points[point] = (live_tensor_bytes() - baseline, categorized(trainer))

    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(args.batch * world, 3, 32, 32, generator=g),
                  torch.randint(0, 10, (args.batch * world,), generator=g), torch.arange(args.batch * world))
    plain = Objective("ce", "train", ce)
    for _ in range(2):  # the optimizer's momentum exists after the first step
        trainer.step([plain], {"train": [batch]})
    out = {"stage": stage, "numel": numel, "partition_numel": trainer.view.partition_numel}

    trainer.probe = probe
    trainer.step([plain], {"train": [batch]})
    out["plain_live"], out["plain"] = points.pop("after_backward")
    for name, spec in (("sam_min", SamSpec(rho=0.05)), ("sam_max", SamSpec(rho=0.05, lamb=1.0, sign="max"))):
        trainer.step([Objective("ce", "train", ce, sam=spec)], {"train": [batch]})
        before_live, before = points.pop("after_backward")
        after_live, after = points.pop("sam_perturbed")
        out[f"{name}_extra_live"] = after_live - before_live
        out[f"{name}_extra_states"] = sum(after.values()) - sum(before.values())
    trainer.probe = None
    engine.destroy()
    gc.collect()
    return out


def worker(args, out_path: str) -> None:
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = []
    for stage in args.stages:
        baseline = live_tensor_bytes()
        row = measure_stage(args, stage, baseline)
        # every rank's numbers: the worst rank is the one that matters
        keys = ["plain_live", "sam_min_extra_live", "sam_min_extra_states", "sam_max_extra_live",
                "sam_max_extra_states", "partition_numel"]
        values = torch.tensor([float(row[k]) for k in keys] + [float(row["plain"][c]) for c in
                                                                  ("params", "grads", "optim")], dtype=torch.float64)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        merged = dict(zip(keys, values[:len(keys)].tolist()))
        merged.update(stage=stage, numel=row["numel"],
                      plain=dict(zip(("params", "grads", "optim"), values[len(keys):].tolist())))
        results.append(merged)
    if torch.distributed.get_rank() == 0:
        Path(out_path).write_text(json.dumps({"world": torch.distributed.get_world_size(), "rows": results}))
    torch.distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--model", default="vit_s",
                        help="a registered model (default vit_s) or a source: timm:vit_large_patch16_224, "
                             "torchvision:vit_l_16, ...")
    parser.add_argument("--options", default="{}", metavar="JSON",
                        help="model.options as JSON, e.g. '{\"depth\": 4}' for a ViT-L cut to 4 blocks")
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 4096],
                        help="widths for --model mlp on 3x32x32 inputs ([4096, 4096]: 29.4M parameters)")
    parser.add_argument("--batch", type=int, default=2, help="per-rank batch")
    parser.add_argument("--bucket", type=int, default=5_000_000, help="DeepSpeed bucket sizes (elements)")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_out:
        worker(args, args.worker_out)
        return 0
    if 0 not in args.stages:
        args.stages = [0, *args.stages]  # the unsharded reference
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        cmd = [*torchrun_command(args.nproc), __file__, "--worker-out", str(out),
               "--model", args.model, "--options", args.options, "--hidden", *map(str, args.hidden),
               "--batch", str(args.batch),
               "--bucket", str(args.bucket),
               "--stages", *map(str, args.stages)]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL if args.json else None)
        if proc.returncode != 0:
            print(f"the ZeRO run failed (exit {proc.returncode})", file=sys.stderr)
            return 2
        data = json.loads(out.read_text())
    world, rows = data["world"], data["rows"]
    ref = next(r for r in rows if r["stage"] == 0)
    ref_states = sum(ref["plain"].values())
    ok = True
    for row in rows:
        states = sum(row["plain"].values())
        row["states_ratio"] = states / ref_states
        row["live_ratio"] = row["plain_live"] / ref["plain_live"]
        partition_bytes = 4 * row["partition_numel"]
        row["sam_min_extra_partitions"] = row["sam_min_extra_states"] / partition_bytes
        row["sam_max_extra_partitions"] = row["sam_max_extra_states"] / partition_bytes
        row["sam_min_extra_live_partitions"] = row["sam_min_extra_live"] / partition_bytes
        row["sam_max_extra_live_partitions"] = row["sam_max_extra_live"] / partition_bytes
        if row["stage"] == 3:
            ok &= row["states_ratio"] <= 1.2 / world
        ok &= max(row["sam_min_extra_live_partitions"], row["sam_max_extra_live_partitions"]) <= 1.05
    if args.json:
        print(json.dumps({"world": world, "numel": ref["numel"], "rows": rows}, indent=2))
    else:
        mb = 2**20
        name = f"MLP {args.hidden}" if args.model == "mlp" else args.model + (
            f" {args.options}" if args.options != "{}" else "")
        print(f"{name} on 3x32x32: {ref['numel'] / 1e6:.1f}M parameters, {world} ranks, fp32, "
              f"SGD+momentum; per-rank MiB (worst rank)")
        print(f"{'stage':>5} {'params':>8} {'grads':>8} {'optim':>8} {'sum':>8} {'ratio':>6} {'x(1/N)':>7} "
              f"{'live':>8} {'ratio':>6}  SAM-min extra / SAM-max extra (partitions, live)")
        for row in rows:
            p = row["plain"]
            print(f"{row['stage']:>5} {p['params'] / mb:8.1f} {p['grads'] / mb:8.1f} {p['optim'] / mb:8.1f} "
                  f"{sum(p.values()) / mb:8.1f} {row['states_ratio']:6.3f} {row['states_ratio'] * world:7.2f} "
                  f"{row['plain_live'] / mb:8.1f} {row['live_ratio']:6.3f}  "
                  f"{row['sam_min_extra_live_partitions']:.2f} / {row['sam_max_extra_live_partitions']:.2f}")
        print(f"target: stage 3 sum ratio <= 1.2/N = {1.2 / world:.2f}; SAM extra <= 1 partition")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
