"""A ``torchvision:`` model unlearned with Sharp MinMax + SAM under ZeRO-3 (2 gloo ranks) equals the same
unlearning in one process on the same global batches (fp32, 1e-5).

The model is torchvision's SqueezeNet 1.1, unmodified (``dropout=0``: both runs must draw no random
masks) and without BatchNorm (each rank would normalise its half-batch with its own statistics, a
data-parallel difference, not a sharding one). Its head is a convolution, so the features come
from ``model.feature_layer=classifier``; digits are resized to 24x24 (``model.input_size``).

With ``model.activation_checkpointing=true`` under ZeRO-3 its Fire blocks recompute in the backward
pass (SAM's second pass too), which fetches the gathered parameters again inside the backward pass;
the result must still equal one process with checkpointing off and with it on.

Run by hand: ``torchrun --nproc_per_node 2 --master_addr 127.0.0.1
tests/integration/test_zero3_own_model.py OUT.json [true|false]`` (the last: activation checkpointing).
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


def worker(out_path: str, checkpointing: str = "false") -> None:
    import gc

    import deepspeed
    import torch
    from torch.utils.data import Subset

    from sharp_unlearn.config import load_config
    from sharp_unlearn.data import build_dataset
    from sharp_unlearn.engine.deepspeed_backend import DeepSpeedBackend
    from sharp_unlearn.engine.deepspeed_config import resolve_deepspeed_config
    from sharp_unlearn.engine.deepspeed_shards import gather_full_params
    from sharp_unlearn.engine.driver import run_epochs
    from sharp_unlearn.engine.runner import run_stage
    from sharp_unlearn.methods import METHODS, UnlearnContext
    from sharp_unlearn.models import build_model
    from sharp_unlearn.optim.factory import sam_spec

    torch.set_num_threads(1)
    gc.freeze()  # ZeRO-3 init calls gc.collect(); freezing what is imported so far makes it cheaper
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    world = torch.distributed.get_world_size()
    common = MODEL + ["train.epochs=1", "train.checkpoint_every=0", "optimizer.name=sam", "optimizer.lr=0.01",
                      "optimizer.rho=0.05", "optimizer.weight_decay=0.0", "method.name=sharp_minmax",
                      "method.alpha=0.9", "method.mask_fraction=0.5", "method.rho_max=0.1", "tracking.enabled=false",
                      "data.augment=false"]
    cfg_ds = load_config([], common + [f"data.batch_size={PER_RANK}", "distributed.backend=deepspeed",
                                       "distributed.zero_stage=3", f"distributed.num_workers={world}",
                                       f"model.activation_checkpointing={checkpointing}"])
    # one-process references: without checkpointing, and (when the sharded run checkpoints) with it
    references = {flag: load_config([], common + [f"data.batch_size={PER_RANK * world}",
                                                  f"model.activation_checkpointing={flag}"])
                  for flag in dict.fromkeys(["false", checkpointing])}
    bundle = build_dataset(cfg_ds.data, cfg_ds.seed)
    datasets = {"retain": Subset(bundle.train, list(range(0, 64))), "forget": Subset(bundle.train, list(range(64, 96)))}

    def prepared(cfg):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
        method = METHODS.get("sharp_minmax")(cfg.method, cfg.optimizer, sam_spec(cfg.optimizer))
        method.prepare(UnlearnContext(model, datasets["retain"], datasets["forget"], bundle.num_classes,
                                      torch.device("cpu"), cfg.seed, batch_size=PER_RANK * world))
        return model, method

    model, method = prepared(cfg_ds)
    # calls of a layer inside a checkpointed Fire block and of the stem convolution, which is no block:
    # more of the former means the blocks really recomputed under ZeRO-3
    calls = {"block": 0, "stem": 0}
    for key, path in (("block", "module.features.3.squeeze"), ("stem", "module.features.0")):
        model.get_submodule(path).register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    backend = DeepSpeedBackend(resolve_deepspeed_config(cfg_ds), torch.device("cpu"), Path(out_path).parent / "zero3")
    result = run_epochs(model, method.phases, datasets, backend=backend, cfg=cfg_ds, optimizer_cfg=cfg_ds.optimizer,
                        train_cfg=cfg_ds.train, epochs=1, resume=False, quiet=True)
    named = list(backend.engine.module.named_parameters())
    partition = sum(int(p.ds_tensor.numel()) for _, p in named)
    total = sum(int(p.ds_numel) for _, p in named)
    full = gather_full_params(backend.engine, named)
    losses = [r["train_loss"] for r in result.history]
    backend.engine.destroy()
    if torch.distributed.get_rank() == 0:
        row = {"partition_numel": partition, "total_numel": total, "names": sorted(full)[:3], "calls": calls,
               "references": {}}
        for flag, cfg_ref in references.items():
            ref_model, ref_method = prepared(cfg_ref)
            initial = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
            ref = run_stage(ref_model, ref_method.phases, datasets, cfg=cfg_ref, optimizer_cfg=cfg_ref.optimizer,
                            train_cfg=cfg_ref.train, epochs=1, device=torch.device("cpu"), quiet=True)
            final = dict(ref_model.named_parameters())
            row["references"][flag] = {
                "max_abs_diff": max(float((full[n] - final[n].detach()).abs().max()) for n in final),
                "moved": max(float((final[n].detach() - initial[n]).abs().max()) for n in final),
                "loss_diff": max(abs(a - b["train_loss"]) for a, b in zip(losses, ref.history))}
        Path(out_path).write_text(json.dumps(row))
    torch.distributed.barrier()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_zero3_unlearning_of_a_torchvision_model_matches_one_process(tmp_path, checkpointing):
    pytest.importorskip("deepspeed")
    out = tmp_path / "result.json"
    flag = str(checkpointing).lower()
    row = run_script(__file__, out, flag, timeout=900)
    assert all(name.startswith("module.") for name in row["names"])  # the user's module, wrapped as it is
    assert row["partition_numel"] <= row["total_numel"] // 2 + 64  # each rank holds about half, never all
    if checkpointing:
        assert row["calls"]["block"] > row["calls"]["stem"], row["calls"]  # the backward pass recomputed
    else:
        assert row["calls"]["block"] == row["calls"]["stem"], row["calls"]
    assert sorted(row["references"]) == sorted({"false", flag})  # checkpointing on: against both references
    for reference in row["references"].values():
        assert reference["moved"] > 1e-4  # the unlearning changed the weights, so equality means something
        assert reference["max_abs_diff"] < TOLERANCE, row
        assert reference["loss_diff"] < 1e-5, row


if __name__ == "__main__":
    worker(*sys.argv[1:])
