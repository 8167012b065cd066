"""Sharded sweep files (``distributed.backend: deepspeed``) are validated before Ray starts, and a
sharded trial's checkpoint (the committed DeepSpeed tag) survives a snapshot / restore round trip.

No Ray, no DeepSpeed process: parsing and file handling only.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.tuning import load_sweep

REPO = Path(__file__).parents[2]
NO_TRACKING = {"enabled": False}


def test_smoke_sharded_file_is_a_zero2_sweep_of_two_cpu_workers_per_trial():
    spec = load_sweep(REPO / "tuning" / "smoke_sharded.yaml", tracking=NO_TRACKING)
    assert spec.sharded is not None
    assert (spec.sharded.zero_stage, spec.sharded.num_workers, spec.sharded.use_gpu) == (2, 2, False)
    assert spec.total_trials >= 4 and spec.scheduler.name == "asha"
    # resources are per worker; the trial's own process adds a sliver, and all of it fits 2 CPUs
    assert spec.trial_resources()["CPU"] <= 2.0 and spec.trial_resources()["GPU"] == 0.0


def test_both_sharded_file_shards_pretraining_and_unlearning_from_base_alone():
    from sharp_unlearn.tuning import prepare_inputs, trial_configs

    spec = load_sweep(REPO / "tuning" / "both_sharded.yaml", tracking=NO_TRACKING)
    assert spec.stage == "both" and spec.sharded is not None
    assert spec.sharded.stages == ("pretrain", "unlearn")
    assert (spec.sharded.zero_stage, spec.sharded.num_workers, spec.sharded.use_gpu) == (2, 2, False)
    assert spec.total_trials == 4 and spec.trial_resources()["CPU"] <= 2.0
    # a SAM-pretrained trial: SAM pretraining, sharded; its unlearning inherits distributed.* from base
    inputs, _ = prepare_inputs(spec, quiet=True)  # stage both: nothing is trained before the trials
    pre, un = trial_configs(inputs, {"pretrain.optimizer": {"name": "sam", "rho": 0.05}, "method.alpha": 0.95})
    assert pre.optimizer.name == "sam" and un.optimizer.name == "sgd"
    assert pre.distributed == un.distributed and un.distributed.backend == "deepspeed"


def test_zero3_file_is_resnet50_on_cifar100_bf16_on_8_gpus_per_trial():
    from sharp_unlearn.config import config_from_dict
    from sharp_unlearn.engine.deepspeed_config import resolve_deepspeed_config

    spec = load_sweep(REPO / "tuning" / "sharp_minmax_zero3.yaml", tracking=NO_TRACKING)
    assert spec.sharded is not None
    assert (spec.sharded.zero_stage, spec.sharded.num_workers, spec.sharded.use_gpu) == (3, 8, True)
    cfg = config_from_dict(spec.unlearn_tree)
    assert cfg.model.name in ("resnet50", "vit_s") and cfg.data.name == "cifar100"
    assert cfg.method.name == "sharp_minmax" and {"method.rho_min", "method.rho_max"} <= set(spec.keys)
    ds = resolve_deepspeed_config(cfg)
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 3
    # the pretrained model the driver trains once is sharded the same way
    assert config_from_dict(spec.pretrain_tree).distributed.zero_stage == 3
    assert spec.resources.gpu == 1.0 and spec.trial_resources()["GPU"] == 8.0
    assert spec.trial_resources()["CPU"] <= 48  # one 8-GPU node of 48 CPUs holds a trial


def test_sharding_given_as_overrides_of_an_unsharded_file():
    spec = load_sweep(REPO / "tuning" / "smoke.yaml",
                      ["unlearn.distributed.backend=deepspeed", "unlearn.distributed.zero_stage=1",
                       "unlearn.distributed.num_workers=2", "resources.cpu=0.5"], tracking=NO_TRACKING)
    assert spec.sharded is not None and spec.sharded.zero_stage == 1 and spec.sharded.stages == ("unlearn",)
    assert spec.trial_resources()["CPU"] == pytest.approx(1.01)


@pytest.mark.parametrize("overrides, message", [
    (["unlearn.distributed.launcher=torchrun"], "distributed.launcher='torchrun'"),
    (["unlearn.distributed.address=ray://head:10001"], "sweep --address"),
    (["resources.gpu=1"], "resources.gpu=1"),
    (["unlearn.distributed.zero_stage=5"], "zero_stage"),
    (["unlearn.distributed.use_gpu=true", "unlearn.device=cpu"], "use_gpu"),
])
def test_bad_sharded_settings_fail_before_ray(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_sweep(REPO / "tuning" / "smoke_sharded.yaml", overrides, tracking=NO_TRACKING)


def test_stage_both_must_shard_both_stages_alike(tmp_path):
    import yaml

    raw = yaml.safe_load((REPO / "tuning" / "smoke_sharded.yaml").read_text())
    raw.update(stage="both", search={"pretrain.optimizer.lr": {"grid": [0.05, 0.1]}})
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="shards unlearn but not pretrain"):
        load_sweep(path, tracking=NO_TRACKING)
    spec = load_sweep(path, ["base.distributed.backend=deepspeed", "base.distributed.zero_stage=2",
                             "base.distributed.num_workers=2"], tracking=NO_TRACKING)
    assert spec.sharded.stages == ("pretrain", "unlearn")
    with pytest.raises(ConfigError, match="same distributed.num_workers"):
        load_sweep(path, ["base.distributed.backend=deepspeed", "base.distributed.num_workers=1"],
                   tracking=NO_TRACKING)


def _committed(sharded: Path, epoch: int, payload: str) -> None:
    tag = f"epoch{epoch:04d}"
    (sharded / tag).mkdir(parents=True, exist_ok=True)
    (sharded / tag / "mp_rank_00_model_states.pt").write_text(payload)
    (sharded / "progress.json").write_text(json.dumps({"tag": tag, "epoch": epoch, "completed": False,
                                                       "config_hash": "h", "history": []}))


def test_sharded_checkpoint_snapshot_and_restore(tmp_path):
    from sharp_unlearn.tuning.sharded import restore_sharded, snapshot_sharded

    run = tmp_path / "run" / "deepspeed"
    _committed(run, 2, "weights at epoch 2")
    snapshot = tmp_path / "tune-checkpoint"
    assert snapshot_sharded(run, snapshot) == 2

    # a retry on a node whose folder is empty (or was cleaned) gets the committed epoch back
    fresh = tmp_path / "fresh" / "deepspeed"
    assert restore_sharded(snapshot, fresh) == 2
    assert (fresh / "epoch0002" / "mp_rank_00_model_states.pt").read_text() == "weights at epoch 2"
    assert json.loads((fresh / "progress.json").read_text())["epoch"] == 2
    assert (fresh / "latest").read_text() == "epoch0002"

    # a folder already further along (committed after the last report) is kept as it is
    _committed(run, 3, "weights at epoch 3")
    assert restore_sharded(snapshot, run) == 3
    assert json.loads((run / "progress.json").read_text())["epoch"] == 3

    # nothing committed yet: nothing to snapshot
    assert snapshot_sharded(tmp_path / "empty", tmp_path / "none") is None


def test_sharded_trials_run_only_as_many_at_once_as_fit_whole():
    """Each waiting trial holds its 0.01 CPU: starting more than fit would starve every trial's workers."""
    from sharp_unlearn.tuning.runner import sharded_concurrency

    spec = load_sweep(REPO / "tuning" / "smoke_sharded.yaml", tracking=NO_TRACKING)
    assert sharded_concurrency(spec, {"CPU": 2.0}) == 1  # 2 x 0.99 + 0.01: one trial on 2 CPUs
    assert sharded_concurrency(spec, {"CPU": 8.0}) == 4
    zero3 = load_sweep(REPO / "tuning" / "sharp_minmax_zero3.yaml", tracking=NO_TRACKING)
    # 8 GPUs per trial: GPUs decide on a 2-node cluster; the file's max_concurrent caps a larger one
    assert sharded_concurrency(zero3, {"CPU": 96.0, "GPU": 16.0}) == 2
    assert sharded_concurrency(zero3, {"CPU": 960.0, "GPU": 160.0}) == zero3.max_concurrent
    unsharded = load_sweep(REPO / "tuning" / "smoke.yaml", tracking=NO_TRACKING)
    assert sharded_concurrency(unsharded, {"CPU": 2.0}) == unsharded.max_concurrent
