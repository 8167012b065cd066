"""ZeRO-3 with ``model.weights`` builds the model inside ``deepspeed.zero.Init`` (2 gloo ranks): right after
construction each rank holds only its partition (no parameter is materialised whole) with the file's
weights loaded into it, and a training stage from there equals the existing ZeRO-3 path (model built
whole, then partitioned by ``deepspeed.initialize``) within 1e-5.

The model is torchvision's SqueezeNet 1.1 (no BatchNorm, ``dropout=0``; see test_zero3_own_model.py)
with weights saved from the same architecture and the data's 10 classes, so no head is refitted.

Run by hand: ``torchrun --nproc_per_node 2 --master_addr 127.0.0.1
tests/integration/test_zero3_partitioned_build.py OUT.json``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torchrun_script import run_script

TOLERANCE = 1e-5
PER_RANK = 16
MODEL = ["model.name=torchvision:squeezenet1_1", "model.options={dropout: 0.0}", "model.feature_layer=classifier",
         "model.input_size=24"]


def worker(out_path: str) -> None:
    import contextlib
    import gc

    import deepspeed
    import torch
    import torchvision
    from torch.utils.data import Subset

    from sharp_unlearn.config import load_config
    from sharp_unlearn.data import build_dataset
    from sharp_unlearn.engine.deepspeed_backend import DeepSpeedBackend
    from sharp_unlearn.engine.deepspeed_config import resolve_deepspeed_config
    from sharp_unlearn.engine.deepspeed_shards import gather_full_params
    from sharp_unlearn.engine.driver import run_epochs
    from sharp_unlearn.engine.objective import Objective, Phase
    from sharp_unlearn.losses import cross_entropy
    from sharp_unlearn.models import build_model
    from sharp_unlearn.optim.factory import sam_spec

    torch.set_num_threads(1)
    gc.freeze()  # ZeRO-3 init calls gc.collect(); freezing what is imported so far makes it cheaper
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    weights = Path(out_path).parent / "squeezenet-10.pt"
    if rank == 0:
        torch.manual_seed(7)
        torch.save(torchvision.models.squeezenet1_1(num_classes=10, dropout=0.0).state_dict(), weights)
    torch.distributed.barrier()
    cfg = load_config([], MODEL + [f"model.weights={weights}", "train.epochs=1", "train.checkpoint_every=0",
                                   "optimizer.name=sam", "optimizer.lr=0.01", "optimizer.rho=0.05",
                                   "optimizer.weight_decay=0.0", "tracking.enabled=false", "data.augment=false",
                                   f"data.batch_size={PER_RANK}", "distributed.backend=deepspeed",
                                   "distributed.zero_stage=3", f"distributed.num_workers={world}"])
    bundle = build_dataset(cfg.data, cfg.seed)
    datasets = {"train": Subset(bundle.train, list(range(0, 96)))}
    phase = Phase("pretrain", [Objective("ce", "train", cross_entropy, sam=sam_spec(cfg.optimizer))])
    state = torch.load(weights, weights_only=True)
    row: dict = {}

    def train(partitioned: bool, label: str):
        backend = DeepSpeedBackend(resolve_deepspeed_config(cfg), torch.device("cpu"), Path(out_path).parent / label)
        torch.manual_seed(cfg.seed)
        with backend.model_construction(cfg.model) if partitioned else contextlib.nullcontext():
            model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
        named = list(model.named_parameters())
        if partitioned:  # right after construction, before deepspeed.initialize
            row["built_local_numel"] = sum(int(p.numel()) for _, p in named)  # materialised: none
            row["built_partition_numel"] = sum(int(p.ds_tensor.numel()) for _, p in named)
            row["built_total_numel"] = sum(int(p.ds_numel) for _, p in named)
            with deepspeed.zero.GatheredParameters([p for _, p in named]):
                row["loaded_diff"] = max(float((p.detach() - state[n.removeprefix("module.")]).abs().max())
                                         for n, p in named)
        result = run_epochs(model, lambda epoch: [phase], datasets, backend=backend, cfg=cfg,
                            optimizer_cfg=cfg.optimizer, train_cfg=cfg.train, epochs=1, resume=False, quiet=True)
        engine_named = list(backend.engine.module.named_parameters())
        full = gather_full_params(backend.engine, engine_named)
        backend.engine.destroy()
        return full, [r["train_loss"] for r in result.history]

    whole, whole_losses = train(False, "whole")
    parted, parted_losses = train(True, "partitioned")
    if rank == 0:
        row.update(max_abs_diff=max(float((parted[n] - whole[n]).abs().max()) for n in whole),
                   moved=max(float((whole[n] - state[n.removeprefix("module.")]).abs().max()) for n in whole),
                   loss_diff=max(abs(a - b) for a, b in zip(parted_losses, whole_losses)), world=world)
        Path(out_path).write_text(json.dumps(row))
    torch.distributed.barrier()


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_with_weights_builds_partitioned_and_matches_the_whole_build(tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("torchvision")
    out = tmp_path / "result.json"
    row = run_script(__file__, out, timeout=900)
    assert row["built_local_numel"] == 0, row  # no parameter materialised whole on any rank
    assert row["built_partition_numel"] <= row["built_total_numel"] // row["world"] + 64, row
    assert row["loaded_diff"] == 0.0, row  # the weights file went into the partitions
    assert row["moved"] > 1e-4, row  # training changed the weights, so equality means something
    assert row["max_abs_diff"] < TOLERANCE, row
    assert row["loss_diff"] < TOLERANCE, row


if __name__ == "__main__":
    worker(sys.argv[1])
