"""Sharp MinMax's switches (perturbed mask scope, full perturbation, sequential updates with
two optimizer states, SAM on the forget side only as method.sam_sides=forget runs it) under ZeRO
0-3 equal the single-process loop, and a sequential run resumes from a DeepSpeed checkpoint
bit-exactly (both sides' optimizer states are in it).

One ``torchrun --nproc_per_node 2`` launch (gloo, CPU) runs every stage and case; rank 0 also
runs the single-process reference (:class:`~sharp_unlearn.engine.loop.Trainer`, itself checked
against hand-written formulas in ``tests/methods/test_sharp_minmax_switches.py``) on the full global
batch and writes the largest parameter difference per (stage, case) to a JSON file.

Run by hand: ``torchrun --nproc_per_node 2 --master_addr 127.0.0.1
tests/integration/test_deepspeed_minmax_switches.py OUT.json 0,1,2,3``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torchrun_script import run_script

pytest.importorskip("deepspeed")  # the `deepspeed` extra

TOLERANCE = 1e-5
STAGES = (0, 1, 2, 3)
#: case -> (forget mask_scope, perturbation of both sides, sequential, forget adaptive, base optimizer)
CASES = {
    "scope-perturbed": ("perturbed", "masked", False, False, "sgd"),
    "perturb-full": ("update", "full", False, True, "sgd"),
    "sequential": ("update", "masked", True, False, "sgd"),
    "paper-code": ("perturbed", "full", True, True, "adamw"),
    "forget-sam-only": ("update", "masked", False, False, "sgd"),
}
#: case -> the side that is plain first-order (method.sam_sides=forget leaves the retain side without SAM)
FIRST_ORDER_SIDE = {"forget-sam-only": "retain"}
STEPS = 3
GLOBAL_BATCH = 16
FEATURES, CLASSES = 13, 5


# ----------------------------------------------------------------- worker (runs under torchrun)
def _objectives(case: str, named_params):
    import torch
    from torch.nn import functional as F

    from sharp_unlearn.engine.objective import Objective, SamSpec

    scope, perturbation, sequential, adaptive, _ = CASES[case]

    def ce(model, batch):
        return 0.9 * F.cross_entropy(model(batch.x), batch.y)

    def neg_ce(model, batch):
        return -0.3 * F.cross_entropy(model(batch.x), batch.y)

    gen = torch.Generator().manual_seed(7)
    mask = {n: (torch.rand(p.shape, generator=gen) < 0.5).float() for n, p in named_params}
    other = {n: 1.0 - m for n, m in mask.items()}
    plain = FIRST_ORDER_SIDE.get(case)
    return [Objective("retain", "retain", ce, sam=None if plain == "retain" else SamSpec(rho=0.05, lamb=1.0),
                      mask=other, perturbation=perturbation, step_group="retain" if sequential else None),
            Objective("forget", "forget", neg_ce, sam=SamSpec(rho=0.1, lamb=0.5, sign="max", adaptive=adaptive),
                      mask=mask, mask_scope=scope, perturbation=perturbation,
                      step_group="forget" if sequential else None)]


def _optimizer(case: str, params):
    import torch

    if CASES[case][4] == "adamw":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=5e-4)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def _data(seed: int):
    import torch

    from sharp_unlearn.engine.objective import Batch

    gen = torch.Generator().manual_seed(seed)
    n = GLOBAL_BATCH * STEPS
    x = torch.randn(n, FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    return [Batch(x[i:i + GLOBAL_BATCH], y[i:i + GLOBAL_BATCH], torch.arange(i, i + GLOBAL_BATCH))
            for i in range(0, n, GLOBAL_BATCH)]


def _model():
    import torch

    from sharp_unlearn.models.mlp import MLP

    torch.manual_seed(0)
    return MLP(CLASSES, (FEATURES,), hidden=(23, 11))  # odd sizes: partitions cut through tensors


def _batches(step: int):
    return {"retain": [_data(2)[step]], "forget": [_data(3)[step]]}


def _reference(case: str):
    from sharp_unlearn.engine.loop import Trainer

    model = _model()
    objectives = _objectives(case, list(model.named_parameters()))
    trainer = Trainer(model, _optimizer(case, model.parameters()), None)
    for step in range(STEPS):
        trainer.step(objectives, _batches(step))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _engine(case: str, stage: int):
    import deepspeed
    import torch

    from sharp_unlearn.config import load_config
    from sharp_unlearn.engine.deepspeed_config import resolve_deepspeed_config
    from sharp_unlearn.engine.deepspeed_engine import DeepSpeedTrainer

    world = torch.distributed.get_world_size()
    cfg = load_config([], ["distributed.backend=deepspeed", f"distributed.zero_stage={stage}",
                           f"distributed.num_workers={world}", f"data.batch_size={GLOBAL_BATCH // world}",
                           "model.name=mlp", "tracking.enabled=false"])
    model = _model()
    objectives = _objectives(case, list(model.named_parameters()))
    engine, *_ = deepspeed.initialize(model=model, optimizer=_optimizer(case, model.parameters()),
                                      config=resolve_deepspeed_config(cfg))
    return engine, DeepSpeedTrainer(engine), objectives


def _deepspeed_run(case: str, stage: int, checkpoint_dir: Path | None):
    """STEPS steps straight; with ``checkpoint_dir`` also 2 steps, a checkpoint, a fresh engine
    that loads it, and the last step: returns (straight weights, resumed weights or None)."""
    from sharp_unlearn.engine.deepspeed_shards import gather_full_params

    engine, trainer, objectives = _engine(case, stage)
    for step in range(STEPS):
        trainer.step(objectives, _batches(step))
    straight = {n: t.cpu() for n, t in gather_full_params(engine, trainer.named_params).items()}
    engine.destroy()
    if checkpoint_dir is None:
        return straight, None
    engine, trainer, objectives = _engine(case, stage)
    for step in range(STEPS - 1):
        trainer.step(objectives, _batches(step))
    engine.save_checkpoint(str(checkpoint_dir), tag="t")
    engine.destroy()
    engine, trainer, objectives = _engine(case, stage)
    engine.load_checkpoint(str(checkpoint_dir), tag="t", load_optimizer_states=True)
    trainer.step(objectives, _batches(STEPS - 1))
    resumed = {n: t.cpu() for n, t in gather_full_params(engine, trainer.named_params).items()}
    engine.destroy()
    return straight, resumed


def worker(out_path: str, stages: list[int]) -> None:
    import gc

    import deepspeed
    import torch

    torch.set_num_threads(1)
    gc.freeze()  # ZeRO-3 init calls gc.collect(): cheaper with the imported objects frozen
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = torch.distributed.get_rank()
    results = {}
    for stage in stages:
        for case in CASES:
            resume_dir = Path(out_path).parent / f"ckpt-zero{stage}-{case}" if CASES[case][2] else None
            straight, resumed = _deepspeed_run(case, stage, resume_dir)
            if rank == 0:
                ref = _reference(case)
                start = _model().state_dict()
                row = {"max_abs_diff": max(float((straight[n] - ref[n]).abs().max()) for n in ref),
                       "moved": max(float((ref[n] - start[n]).abs().max()) for n in ref)}
                if resumed is not None:
                    row["resume_equal"] = all(torch.equal(resumed[n], straight[n]) for n in straight)
                results[f"zero{stage}/{case}"] = row
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    torch.distributed.barrier()


# ----------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def switches(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds-switches") / "results.json"
    return run_script(__file__, out, ",".join(map(str, STAGES)), timeout=900)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", list(CASES))
def test_switch_under_zero_matches_single_process(switches, stage, case):
    row = switches[f"zero{stage}/{case}"]
    assert row["moved"] > 1e-3  # the steps really changed the weights, so equality means something
    assert row["max_abs_diff"] < TOLERANCE, row


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", [c for c, spec in CASES.items() if spec[2]])
def test_sequential_resumes_bit_exactly_from_a_deepspeed_checkpoint(switches, stage, case):
    assert switches[f"zero{stage}/{case}"]["resume_equal"] is True


if __name__ == "__main__":
    worker(sys.argv[1], [int(s) for s in sys.argv[2].split(",")])
