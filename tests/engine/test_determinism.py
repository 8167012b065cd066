"""`deterministic=true` / `--deterministic`: the same seed gives the same bits, whatever the parent's threads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bad_input.harness import SMALL, run_cli

from sharp_unlearn.cli import build_parser
from sharp_unlearn.commands.base import config_from_args
from sharp_unlearn.engine.determinism import apply_determinism
from sharp_unlearn.errors import ConfigError


@pytest.fixture
def restore_torch_state():
    """apply_determinism changes process-wide torch settings: put them back for the other tests."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark, cudnn_det = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, cudnn_det


def _pretrain(tmp_path: Path, name: str, omp_threads: int, *extra: str) -> dict[str, torch.Tensor]:
    out = tmp_path / name
    proc = run_cli(["pretrain", "--no-tracking", "--json", f"output_dir={out}", "train.epochs=2", *extra],
                   tmp_path, timeout=900, env={"OMP_NUM_THREADS": str(omp_threads)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = json.loads(proc.stdout)["checkpoint"]
    assert Path(checkpoint).is_relative_to(out)
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
def test_deterministic_pretrain_is_bit_identical_across_parent_thread_counts(tmp_path):
    # without --deterministic these two runs differ here (max |dw| ~2e-7 after 2 epochs of the default
    # small_cnn): the sums are split over 1 vs 2 threads; with it both use one thread and the same kernels
    one = _pretrain(tmp_path, "omp1", 1, "--deterministic")
    two = _pretrain(tmp_path, "omp2", 2, "--deterministic")
    assert one.keys() == two.keys()
    different = [k for k in one if not torch.equal(one[k], two[k])]
    assert not different, different


@pytest.mark.slow
def test_deterministic_with_explicit_threads_repeats_bit_for_bit(tmp_path):
    first = _pretrain(tmp_path, "a", 1, "--deterministic", "threads=2", *SMALL)
    second = _pretrain(tmp_path, "b", 2, "--deterministic", "threads=2", *SMALL)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_apply_determinism_fixes_threads_and_kernels(small_cfg, restore_torch_state):
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)
    apply_determinism(small_cfg())  # off and no threads: torch's own choice stays
    assert torch.get_num_threads() == 2
    assert not torch.are_deterministic_algorithms_enabled()

    apply_determinism(small_cfg("deterministic=true"))
    assert torch.get_num_threads() == 1
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark

    apply_determinism(small_cfg("deterministic=true", "threads=3"))
    assert torch.get_num_threads() == 3


def test_threads_alone_sets_the_count_without_deterministic_kernels(small_cfg, restore_torch_state):
    torch.use_deterministic_algorithms(False)
    apply_determinism(small_cfg("threads=1"))
    assert torch.get_num_threads() == 1
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("value", ["0", "-1"])
def test_threads_below_one_is_a_config_error(small_cfg, value):
    with pytest.raises(ConfigError, match=f"threads={value}"):
        small_cfg(f"threads={value}")


@pytest.mark.parametrize("argv", [
    ["pretrain"], ["unlearn", "--checkpoint", "x.pt"], ["retrain", "--checkpoint", "x.pt"],
    ["mask", "--checkpoint", "x.pt"], ["memorization"], ["evaluate", "x.pt"],
    ["demo"], ["reproduce", "theory"], ["sweep", "tuning/smoke.yaml"],
])
def test_every_training_command_takes_deterministic(argv):
    args = build_parser().parse_args([*argv, "--deterministic"])
    assert args.deterministic is True


def test_the_flag_reaches_the_config(tmp_path):
    args = build_parser().parse_args(["pretrain", "--deterministic", f"output_dir={tmp_path}"])
    cfg = config_from_args(args)
    assert cfg.deterministic is True and cfg.threads is None
    assert config_from_args(build_parser().parse_args(["pretrain"])).deterministic is False
