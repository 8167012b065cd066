"""run_stage: resume gives identical results; divergence raises and writes nothing."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from sharp_unlearn.data import build_dataset
from sharp_unlearn.engine.checkpoint import load_checkpoint
from sharp_unlearn.engine.objective import Objective, Phase
from sharp_unlearn.engine.runner import run_stage
from sharp_unlearn.errors import TrainingDiverged
from sharp_unlearn.models import build_model
from sharp_unlearn.optim.factory import sam_spec


class Killed(Exception):
    """Stands in for the process dying between two epochs."""


def ce(model, batch):
    return F.cross_entropy(model(batch.x), batch.y)


def stage(cfg, checkpoint: Path | None, epochs: int, *, kill_after: int | None = None, seed_model: bool = True):
    bundle = build_dataset(cfg.data, cfg.seed)
    if seed_model:
        torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
    phase = Phase("pretrain", [Objective("ce", "train", ce, sam=sam_spec(cfg.optimizer))])

    def evaluate(model, epoch):
        # runs after each epoch's training, before that epoch's checkpoint: dying here
        # loses epoch `kill_after + 1` and keeps the checkpoint of epoch `kill_after`
        if kill_after is not None and epoch == kill_after + 1:
            raise Killed
        return {}

    result = run_stage(model, lambda epoch: [phase], {"train": bundle.train}, cfg=cfg,
                       optimizer_cfg=cfg.optimizer, train_cfg=cfg.train, epochs=epochs,
                       device=torch.device("cpu"), checkpoint_path=checkpoint,
                       checkpoint_meta={"config_hash": cfg.training_hash()}, evaluate=evaluate, quiet=True)
    return model, result


def subset_cfg(small_cfg, *overrides):
    # a few hundred digits keep four epochs to about a second
    return small_cfg("train.epochs=4", "optimizer.name=sam", "optimizer.rho=0.1", "train.warmup_epochs=1",
                     "data.batch_size=128", *overrides)


def test_resume_continues_with_identical_results(small_cfg, tmp_path):
    cfg = subset_cfg(small_cfg)
    straight_model, straight = stage(cfg, tmp_path / "straight.pt", epochs=4)

    ckpt = tmp_path / "resumed.pt"
    with pytest.raises(Killed):
        stage(cfg, ckpt, epochs=4, kill_after=2)
    saved = load_checkpoint(ckpt)
    assert saved["epoch"] == 2 and not saved["completed"]
    # a fresh process would build the model from another seed: resume must not care
    torch.manual_seed(12345)
    resumed_model, resumed = stage(cfg, ckpt, epochs=4, seed_model=False)

    assert resumed.resumed_from == 2
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    for (name, a), (_, b) in zip(straight_model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    final = load_checkpoint(ckpt)
    assert final["completed"] and final["epoch"] == 4


def test_completed_or_foreign_checkpoint_is_not_resumed(small_cfg, tmp_path):
    cfg = subset_cfg(small_cfg, "train.epochs=1")
    ckpt = tmp_path / "c.pt"
    _, first = stage(cfg, ckpt, epochs=1)
    assert first.resumed_from == 0
    _, again = stage(cfg, ckpt, epochs=1)  # completed: trains from scratch, not from epoch 1
    assert again.resumed_from == 0 and len(again.history) == 1
    other = subset_cfg(small_cfg, "train.epochs=1", "optimizer.rho=0.2")
    with pytest.raises(Killed):
        stage(cfg, ckpt, epochs=3, kill_after=1)
    _, foreign = stage(other, ckpt, epochs=3)  # another config hash: not resumed
    assert foreign.resumed_from == 0


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_nan_loss_raises_and_leaves_checkpoints_untouched(small_cfg, tmp_path, optimizer):
    good_cfg = subset_cfg(small_cfg, "train.epochs=1")
    ckpt = tmp_path / "input.pt"
    stage(good_cfg, ckpt, epochs=1)
    before = digest(ckpt)

    bad_cfg = subset_cfg(small_cfg, f"optimizer.name={optimizer}", "optimizer.lr=1e30", "train.warmup_epochs=0",
                         "train.epochs=2")
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        stage(bad_cfg, ckpt, epochs=2)  # same path: a crash must not clobber the existing file
    assert digest(ckpt) == before
    out = tmp_path / "out.pt"
    with pytest.raises(TrainingDiverged):
        stage(bad_cfg, out, epochs=2)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.pt"]  # no temp files either
