"""Bad distributed input is rejected before any worker or process group starts."""
from __future__ import annotations

import json

import pytest

from sharp_unlearn.config import load_config
from sharp_unlearn.engine.deepspeed_config import (
    packaged_deepspeed_config,
    resolve_deepspeed_config,
    validate_distributed,
)
from sharp_unlearn.errors import ConfigError

BASE = ["distributed.backend=deepspeed", "distributed.num_workers=2", "data.batch_size=32",
        "model.name=mlp", "tracking.enabled=false"]


def cfg_with(*overrides):
    return load_config([], BASE + list(overrides))


def user_json(tmp_path, **entries):
    """A user DeepSpeed file: the packaged ZeRO-2 one with some entries replaced."""
    base = json.loads(packaged_deepspeed_config(2).read_text())
    base.update(entries)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(base))
    return str(path)


def test_packaged_config_is_filled_from_the_run_config():
    ds = resolve_deepspeed_config(cfg_with("distributed.zero_stage=3", "train.grad_accum=2", "train.grad_clip=0.5"))
    assert ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 32 * 2 * 2
    assert ds["gradient_clipping"] == 0.5  # always explicit: DeepSpeed's own default clips at 1.0
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in ds  # torch optimizers are passed in: nothing compiles a CPU Adam


@pytest.mark.parametrize("stage", ["4", "-1", "two"])
def test_zero_stage_outside_0_to_3(stage):
    with pytest.raises(ConfigError, match="zero_stage"):
        cfg_with(f"distributed.zero_stage={stage}")


def test_more_workers_than_cpus():
    cfg = cfg_with("distributed.num_workers=3")
    with pytest.raises(ConfigError, match=r"num_workers=3 needs 3 CPUs.*has 2"):
        validate_distributed(cfg, available={"CPU": 2, "GPU": 0})


def test_more_workers_than_gpus():
    cfg = cfg_with("distributed.use_gpu=true", "distributed.num_workers=2")
    with pytest.raises(ConfigError, match=r"needs 2 GPUs.*has 1"):
        validate_distributed(cfg, available={"CPU": 64, "GPU": 1})


@pytest.mark.parametrize("entries, pattern", [
    ({"train_batch_size": 512}, r"train_batch_size=512 contradicts .*data.batch_size=32 x distributed.num_workers=2"),
    ({"train_micro_batch_size_per_gpu": 16}, r"train_micro_batch_size_per_gpu=16 contradicts .*data.batch_size=32"),
    ({"gradient_accumulation_steps": 4}, r"gradient_accumulation_steps=4 contradicts .*train.grad_accum=1"),
    ({"gradient_clipping": 1.0}, r"gradient_clipping=1.0 contradicts train.grad_clip=0.0"),
    ({"zero_optimization": {"stage": 3}}, r"zero_optimization.stage=3 contradicts distributed.zero_stage=2"),
    ({"zero_optimization": {"stage": 7}}, r"zero_optimization.stage=7 is not valid"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 0.1}}}, r"remove the 'optimizer' section"),
    ({"scheduler": {"type": "WarmupLR"}}, r"remove the 'scheduler' section"),
    ({"fp16": {"enabled": True}}, r"fp16.enabled=true is not supported"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, r"offload_optimizer.device='cpu'"),
    ({"train_batch_size": "lots"}, r"train_batch_size='lots' is not an integer"),
])
def test_user_deepspeed_json_contradicting_the_run_config(tmp_path, entries, pattern):
    cfg = cfg_with("distributed.zero_stage=2", f"distributed.deepspeed_config={user_json(tmp_path, **entries)}")
    with pytest.raises(ConfigError, match=pattern):
        resolve_deepspeed_config(cfg)


def test_user_json_that_agrees_is_accepted(tmp_path):
    path = user_json(tmp_path, train_batch_size=64, gradient_accumulation_steps=1, gradient_clipping=0.0)
    ds = resolve_deepspeed_config(cfg_with("distributed.zero_stage=2", f"distributed.deepspeed_config={path}"))
    assert ds["train_batch_size"] == 64


def test_bf16_needs_a_zero_stage_with_masters(tmp_path):
    path = user_json(tmp_path, bf16={"enabled": True}, zero_optimization={"stage": 0})
    with pytest.raises(ConfigError, match="bf16 needs zero_optimization.stage >= 1"):
        resolve_deepspeed_config(cfg_with("distributed.zero_stage=0", f"distributed.deepspeed_config={path}"))


def test_missing_or_broken_user_json(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_deepspeed_config(cfg_with(f"distributed.deepspeed_config={tmp_path / 'nope.json'}"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_deepspeed_config(cfg_with(f"distributed.deepspeed_config={bad}"))


def test_torchrun_cannot_take_a_ray_address():
    from sharp_unlearn.recipes.distributed import validate_launch

    cfg = cfg_with("distributed.launcher=torchrun", "distributed.address=ray://head:10001")
    with pytest.raises(ConfigError, match="needs distributed.launcher=ray"):
        validate_launch(cfg)


@pytest.mark.distributed
@pytest.mark.parametrize("override, message", [
    ("distributed.num_workers=64", "num_workers=64 needs 64 CPUs"),
    ("distributed.zero_stage=5", "distributed.zero_stage=5 is not valid"),
])
def test_cli_rejects_before_any_process_starts(tmp_path, capsys, monkeypatch, override, message):
    from sharp_unlearn.cli import main
    from sharp_unlearn.recipes import distributed

    launches = []  # the only two ways workers start; a call is a launch, whatever the load on the machine
    monkeypatch.setattr(distributed, "launch_torchrun", lambda spec: launches.append(("torchrun", spec)))
    monkeypatch.setattr(distributed, "launch_ray", lambda spec, address=None: launches.append(("ray", spec)))
    code = main(["pretrain", f"output_dir={tmp_path / 'runs'}", *BASE, "distributed.launcher=torchrun", override])
    assert code == 2
    assert message in capsys.readouterr().err
    assert launches == []  # rejected before any worker was started
    assert not list((tmp_path / "runs").glob("**/launch"))  # workers write their pid files there


@pytest.mark.parametrize("name, stage", [("zero3-bf16-nccl.json", 3), ("zero2-bf16-nccl.json", 2)])
def test_cluster_deepspeed_files_agree_with_a_gpu_run_config(name, stage):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "cluster" / "deepspeed" / name
    cfg = cfg_with("distributed.use_gpu=true", f"distributed.zero_stage={stage}", "distributed.num_workers=16",
                   "train.grad_clip=1.0", f"distributed.deepspeed_config={path}")
    ds = resolve_deepspeed_config(cfg)
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 32 * 16 and ds["gradient_clipping"] == 1.0
    with pytest.raises(ConfigError, match="contradicts distributed.zero_stage"):
        resolve_deepspeed_config(cfg_with(f"distributed.zero_stage={5 - stage}",
                                          f"distributed.deepspeed_config={path}"))
