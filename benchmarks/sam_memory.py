"""Peak memory inside one training step, SAM's kinds vs plain SGD, in parameter-sizes and MiB.

For each model (ResNet-18 on 3x32x32 at batch 16, and the MLP) one step of the
engine's loop (``Trainer.step``, SGD with momentum and weight decay) is run
per kind, after a warm-up step that creates the optimizer's state:

* ``sgd``: one cross-entropy objective, no SAM (the baseline);
* ``sgd pair``: the two masked objectives of Sharp MinMax without SAM (what
  the two-objective methods hold before SAM adds anything);
* ``sam``: textbook SAM (``lamb=1``, min), ``sam-max``: ``sign=max, lamb=0.5``,
  ``asam``: adaptive SAM (``lamb=1``, min);
* ``sharp minmax``: two SAM objectives with complementary masks, retain side
  SAM-min, forget side SAM-max (``lamb=1``), as ``methods/sharp_minmax.py`` builds them.

Memory is counted exactly, not from allocator statistics:
:class:`sharp_unlearn.optim.memory.TensorBytes`, a ``TorchDispatchMode`` that
sums the bytes of the tensor storages created inside the step while they are
alive and keeps the peak (sampled after every operation, backward included).
Weights, optimizer state and the batch exist before the step and are not
counted. The extra of a kind = its peak minus SGD's, printed in units of the
model's trainable-parameter bytes (one "parameter-size") and in MiB.

    python benchmarks/sam_memory.py            # ResNet-18 and the MLP
    python benchmarks/sam_memory.py --quick    # a small MLP only (seconds)
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from sharp_unlearn.config import ModelConfig
from sharp_unlearn.engine.loop import Trainer
from sharp_unlearn.engine.objective import Batch, Objective, SamSpec
from sharp_unlearn.markdown import markdown_table
from sharp_unlearn.models import build_model
from sharp_unlearn.optim.memory import TensorBytes, parameter_bytes

MIB = 2**20


@dataclass
class Case:
    name: str
    model: str
    options: dict
    input_shape: tuple[int, ...]
    batch: int


@dataclass
class Row:
    case: str
    kind: str
    peak_mib: float
    extra_mib: float  # peak minus SGD's
    extra_params: float  # the same in parameter-sizes
    param_mib: float


def ce(model, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch.x), batch.y)


def negated_ce(model, batch: Batch) -> torch.Tensor:
    return -F.cross_entropy(model(batch.x), batch.y)


def complementary_masks(model: torch.nn.Module, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    inside = {n: (torch.rand(p.shape, generator=g) < 0.3).to(p.dtype) for n, p in model.named_parameters()}
    return inside, {n: 1 - m for n, m in inside.items()}


def kinds(model: torch.nn.Module, rho: float) -> dict[str, list[Objective]]:
    inside, outside = complementary_masks(model)
    return {
        "sgd": [Objective("ce", "retain", ce)],
        "sgd pair": [Objective("retain", "retain", ce, mask=outside),
                     Objective("forget", "forget", negated_ce, mask=inside)],
        "sam": [Objective("ce", "retain", ce, sam=SamSpec(rho=rho))],
        "sam-max lamb 0.5": [Objective("ce", "retain", ce, sam=SamSpec(rho=rho, sign="max", lamb=0.5))],
        "asam": [Objective("ce", "retain", ce, sam=SamSpec(rho=rho, adaptive=True))],
        "sharp minmax": [Objective("retain", "retain", ce, sam=SamSpec(rho=rho), mask=outside),
                         Objective("forget", "forget", negated_ce, sam=SamSpec(rho=rho, sign="max"), mask=inside)],
    }


def step_peak(model: torch.nn.Module, objectives: list[Objective], batches: dict[str, list[Batch]]) -> int:
    """Peak bytes of the tensors one step creates, after a warm-up step (momentum buffers exist)."""
    model = copy.deepcopy(model)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4))
    trainer.step(objectives, batches)
    with TensorBytes() as counter:
        trainer.step(objectives, batches)
    return counter.peak


def measure(case: Case, rho: float) -> list[Row]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(case.model, case.options), 10, case.input_shape)
    g = torch.Generator().manual_seed(1)

    def batch() -> Batch:
        return Batch(torch.randn(case.batch, *case.input_shape, generator=g),
                     torch.randint(0, 10, (case.batch,), generator=g), torch.arange(case.batch))

    batches = {"retain": [batch()], "forget": [batch()]}
    unit = parameter_bytes(model)
    peaks = {kind: step_peak(model, objectives, batches) for kind, objectives in kinds(model, rho).items()}
    return [Row(case.name, kind, peak / MIB, (peak - peaks["sgd"]) / MIB, (peak - peaks["sgd"]) / unit, unit / MIB)
            for kind, peak in peaks.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small MLP only (a smoke run)")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        cases = [Case("mlp 3x8x8 [64]x4 b16", "mlp", {"hidden": [64, 64, 64, 64]}, (3, 8, 8), 16)]
    else:
        cases = [Case("resnet18 3x32x32 b16", "resnet18", {}, (3, 32, 32), 16),
                 Case("mlp 3x32x32 (default widths) b16", "mlp", {}, (3, 32, 32), 16)]
    rows = [row for case in cases for row in measure(case, args.rho)]
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          "TensorBytes (TorchDispatchMode: live tensor storages created inside the step)")
    for case in cases:
        print(f"\n{case.name}: one parameter-size = "
              f"{next(r.param_mib for r in rows if r.case == case.name):.1f} MiB")
        columns = ["kind", "peak in step (MiB)", "peak (parameter-sizes)", "extra over sgd (MiB)",
                   "extra (parameter-sizes)"]
        table = [dict(zip(columns, [r.kind, f"{r.peak_mib:.1f}", f"{r.peak_mib / r.param_mib:.2f}",
                                    f"{r.extra_mib:+.1f}", f"{r.extra_params:+.2f}"]))
                 for r in rows if r.case == case.name]
        print(markdown_table(columns, table), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
