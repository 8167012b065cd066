"""Sharp MinMax (SAM-min on retain, SAM-max on forget, saliency mask) on the LM demo's tiny GPT under
ZeRO-3 (2 gloo ranks) equals the same unlearning in one process on the same global batches (fp32, 1e-5),
on the final weights and on every step's retain and forget loss.

The batches are question-answer sequences: ``(batch, tokens)`` ids, answer-only labels (``-100``
elsewhere) and ``(batch, tokens, vocab)`` logits. Answers differ in length, so each rank's half of a
batch holds a different number of scored tokens; the engine weighs each rank by its tokens
(``Objective.mean_over``), which is what makes the token-mean loss of the two halves the full batch's.
The retain stream is one global batch long, so each epoch is one step and the per-epoch losses of
the driver's history are the per-step losses.

Run by hand: ``torchrun --nproc_per_node 2 --master_addr 127.0.0.1
tests/integration/test_zero3_tiny_gpt.py OUT.json``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torchrun_script import run_script

TOLERANCE = 1e-5
PER_RANK = 8
STEPS = 3


def worker(out_path: str) -> None:
    import copy
    import gc

    import deepspeed
    import torch
    from torch.utils.data import Subset

    from sharp_unlearn.config import load_config
    from sharp_unlearn.engine.deepspeed_backend import DeepSpeedBackend
    from sharp_unlearn.engine.deepspeed_config import resolve_deepspeed_config
    from sharp_unlearn.engine.deepspeed_shards import gather_full_params
    from sharp_unlearn.engine.driver import run_epochs
    from sharp_unlearn.engine.runner import run_stage
    from sharp_unlearn.losses import scored_per_row
    from sharp_unlearn.methods import METHODS, UnlearnContext
    from sharp_unlearn.optim.factory import sam_spec
    from sharp_unlearn.recipes.lm import LMDemoSettings, build_setup

    torch.set_num_threads(1)
    gc.freeze()  # ZeRO-3 init calls gc.collect(); freezing what is imported so far makes it cheaper
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    world = torch.distributed.get_world_size()
    common = [f"train.epochs={STEPS}", "train.checkpoint_every=0", "optimizer.name=sam", "optimizer.lr=0.05",
              "optimizer.rho=0.05", "optimizer.weight_decay=0.0", "method.name=sharp_minmax", "method.alpha=0.5",
              "method.mask_fraction=0.5", "method.rho_max=0.1", "tracking.enabled=false"]
    cfg_ds = load_config([], common + [f"data.batch_size={PER_RANK}", "distributed.backend=deepspeed",
                                       "distributed.zero_stage=3", f"distributed.num_workers={world}"])
    cfg_ref = load_config([], common + [f"data.batch_size={PER_RANK * world}"])
    setup = build_setup(LMDemoSettings(subjects=6, forget_size=0.2, heldout_fraction=0.0, n_embd=16, n_layer=1))
    datasets = {"retain": Subset(setup.retain, list(range(PER_RANK * world))), "forget": setup.forget}

    def prepared(cfg):
        model = copy.deepcopy(setup.initial)
        method = METHODS.get("sharp_minmax")(cfg.method, cfg.optimizer, sam_spec(cfg.optimizer))
        method.prepare(UnlearnContext(model, datasets["retain"], datasets["forget"], len(setup.tokenizer),
                                      torch.device("cpu"), cfg.seed, batch_size=PER_RANK * world))
        return model, method

    model, method = prepared(cfg_ds)  # the mask is computed on the full model, before sharding
    backend = DeepSpeedBackend(resolve_deepspeed_config(cfg_ds), torch.device("cpu"), Path(out_path).parent / "zero3")
    result = run_epochs(model, method.phases, datasets, backend=backend, cfg=cfg_ds, optimizer_cfg=cfg_ds.optimizer,
                        train_cfg=cfg_ds.train, epochs=STEPS, resume=False, quiet=True)
    named = list(backend.engine.module.named_parameters())
    partition = sum(int(p.ds_tensor.numel()) for _, p in named)
    total = sum(int(p.ds_numel) for _, p in named)
    full = gather_full_params(backend.engine, named)
    backend.engine.destroy()
    if torch.distributed.get_rank() == 0:
        ref_model, ref_method = prepared(cfg_ref)
        initial = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
        ref = run_stage(ref_model, ref_method.phases, datasets, cfg=cfg_ref, optimizer_cfg=cfg_ref.optimizer,
                        train_cfg=cfg_ref.train, epochs=STEPS, device=torch.device("cpu"), quiet=True)
        final = dict(ref_model.named_parameters())
        keys = ("loss_retain", "loss_forget")
        row = {"max_abs_diff": max(float((full[n] - final[n].detach()).abs().max()) for n in final),
               "moved": max(float((final[n].detach() - initial[n]).abs().max()) for n in final),
               "loss_diff": max(abs(a[k] - b[k]) for a, b in zip(result.history, ref.history) for k in keys),
               "steps": [len(result.history), len(ref.history)],
               "losses": [[r[k] for k in keys] for r in ref.history],
               "answer_lengths": sorted({int(n) for n in scored_per_row(setup.forget.labels)}),
               "partition_numel": partition, "total_numel": total}
        Path(out_path).write_text(json.dumps(row))
    torch.distributed.barrier()


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_sharp_minmax_on_a_tiny_gpt_matches_one_process(tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    out = tmp_path / "result.json"
    row = run_script(__file__, out, timeout=900)
    assert row["steps"] == [STEPS, STEPS]
    assert row["partition_numel"] <= row["total_numel"] // 2 + 64  # each rank holds about half, never all
    # answers differ in length, so ranks weighted by rows instead of scored tokens would not match
    assert len(row["answer_lengths"]) > 1, row
    assert row["moved"] > 1e-4  # the unlearning changed the weights, so equality means something
    assert len({tuple(step) for step in row["losses"]}) == STEPS  # every step's losses differ: they were compared
    assert row["max_abs_diff"] < TOLERANCE, row
    assert row["loss_diff"] < TOLERANCE, row


if __name__ == "__main__":
    worker(sys.argv[1])
