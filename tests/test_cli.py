"""The command line as users run it: a real process, exit codes, stderr, --json."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sharp_unlearn.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.options={width: 8, feature_dim: 32}"]


def run_cli(args: list[str], cwd: Path, entry: str = "module", timeout: int = 300) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-m", "sharp_unlearn"] if entry == "module" else [shutil.which("sharp-unlearn")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([*prefix, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("sharp-unlearn pretrain: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert proc.stdout == ""


@pytest.mark.parametrize("override, needles", [
    ("data.name=mnist", ["'mnist'", "digits", "cifar10"]),
    ("model.name=alexnet", ["'alexnet'", "mlp", "small_cnn"]),
    ("optimizer.name=lbfgs", ["optimizer.name='lbfgs'", "sgd, adam, adamw, sam, asam"]),
    ("optimizer.rho=-0.5", ["optimizer.rho=-0.5", "a finite value >= 0.0"]),
    ("foo", ["'foo'", "key=value"]),
    ("optimizer.rhoo=0.1", ["optimizer.rhoo", "rho"]),
    ("data.augment=maybe", ["data.augment='maybe'", "true or false"]),
])
def test_bad_input_is_one_line_exit_2(override, needles, tmp_path):
    proc = run_cli(["pretrain", "--no-tracking", f"output_dir={tmp_path}", override], tmp_path)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "pretrain").exists()  # nothing ran


def test_console_script_and_malformed_yaml(tmp_path):
    assert shutil.which("sharp-unlearn"), "the console script is not installed (pip install -e .)"
    broken = tmp_path / "broken.yaml"
    broken.write_text("optimizer:\n  rho: [0.1,\n  lr: 2\n")
    proc = run_cli(["pretrain", "--no-tracking", "--config", str(broken)], tmp_path, entry="script")
    assert_one_line_error(proc, "broken.yaml", "not valid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epochs: 2\n  epocs: 3\n")
    proc = run_cli(["pretrain", "--no-tracking", "-c", str(unknown)], tmp_path, entry="script")
    assert_one_line_error(proc, "train.epocs", "epochs")
    proc = run_cli(["pretrain", "--no-tracking", "-c", str(tmp_path / "nowhere.yaml")], tmp_path, entry="script")
    assert_one_line_error(proc, "nowhere.yaml", "does not exist")


def test_missing_cifar_root(tmp_path):
    proc = run_cli(["pretrain", "--no-tracking", "data.name=cifar10", f"data.root={tmp_path / 'no-cifar'}"],
                   tmp_path)
    assert_one_line_error(proc, "no-cifar", "cifar-10-batches-py")


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli(["pretrain", "--no-tracking", "--debug", "data.name=mnist"], tmp_path)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "mnist" in proc.stderr


def test_unknown_command_and_version(tmp_path):
    proc = run_cli(["fly"], tmp_path)
    assert proc.returncode == 2 and "fly" in proc.stderr and "pretrain" in proc.stderr
    proc = run_cli(["--version"], tmp_path, entry="script")
    assert proc.returncode == 0 and proc.stdout.startswith("sharp-unlearn ")


def pretrain_json(tmp_path: Path, *overrides: str) -> dict:
    proc = run_cli(["pretrain", "--no-tracking", "--json", f"output_dir={tmp_path / 'runs'}", *overrides], tmp_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # stdout is pure JSON: no table, no progress bar


def test_json_output_parses(tmp_path):
    result = pretrain_json(tmp_path, "train.epochs=2", *SMALL)
    assert set(result) >= {"checkpoint", "run_id", "train_acc", "val_acc", "test_acc", "train_loss", "wall_seconds"}
    assert 0.0 <= result["test_acc"] <= 100.0 and result["test_acc"] > 20.0  # two epochs: well above chance (~68 %)
    checkpoint = Path(result["checkpoint"])
    assert checkpoint.is_file() and (checkpoint.parent / "config.yaml").is_file()
    assert load_checkpoint(checkpoint)["completed"]


def test_diverged_run_exits_1(tmp_path):
    proc = run_cli(["pretrain", "--no-tracking", f"output_dir={tmp_path}", "optimizer.lr=1e30", "train.epochs=1",
                    *SMALL], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "diverged" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sam_pretrain_matches_sgd_on_digits(tmp_path):
    common = ["train.epochs=10", "seed=0"]
    sgd = pretrain_json(tmp_path, "optimizer.name=sgd", *common)
    sam = pretrain_json(tmp_path, "optimizer.name=sam", "optimizer.rho=0.05", *common)
    assert sgd["test_acc"] > 90.0  # the comparison means something only if SGD learned
    assert sam["test_acc"] >= sgd["test_acc"] - 2.0, (sam["test_acc"], sgd["test_acc"])
    for result in (sgd, sam):
        losses = [row["train_loss"] for row in load_checkpoint(result["checkpoint"])["history"]]
        assert len(losses) == 10
        assert losses[-1] < 0.5 * losses[0]
        # steadily down early on
        assert all(later < earlier for earlier, later in zip(losses[:3], losses[1:4], strict=True))


# ------------------------------------------------------------------ consistency: help, config show, --checkpoint
def test_every_command_help_ends_with_examples(tmp_path):
    from sharp_unlearn.cli import build_parser
    from sharp_unlearn.commands import COMMANDS

    parser = build_parser()
    assert "docstring" not in (parser.description or "") and "``" not in (parser.description or "")
    assert parser.description.startswith("sharpness-aware machine unlearning")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in COMMANDS.names():
        text = sub.choices[name].format_help()
        tail = text.rstrip().split("examples:\n", 1)
        assert len(tail) == 2, f"{name} --help has no examples"
        examples = [line.strip() for line in tail[1].splitlines()]
        assert 1 <= len(examples) <= 3 and all(e.startswith(f"sharp-unlearn {name}") for e in examples), examples
    # one real process: the epilog keeps its line breaks
    proc = run_cli(["evaluate", "--help"], tmp_path)
    assert proc.returncode == 0
    assert "\nexamples:\n  sharp-unlearn evaluate --checkpoint " in proc.stdout


def test_config_show_prints_the_resolved_config(tmp_path):
    import yaml

    proc = run_cli(["config", "show", "optimizer.name=sam", "train.epochs=5", "--no-tracking"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    tree = yaml.safe_load(proc.stdout)
    assert tree["optimizer"]["name"] == "sam" and tree["train"]["epochs"] == 5
    assert tree["tracking"]["enabled"] is False and tree["data"]["name"] == "digits"  # defaults filled in
    proc = run_cli(["config", "show", "--command", "demo", "base.train.epochs=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    spec = yaml.safe_load(proc.stdout)
    assert spec["base"]["train"]["epochs"] == 3 and spec["pretrain_optimizers"] == ["sgd", "sam"]
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing was written (no runs/, no mlruns.db)


def test_config_show_from_a_checkpoint(tmp_path):
    import yaml

    checkpoint = pretrain_json(tmp_path, "train.epochs=1", "seed=3", *SMALL)["checkpoint"]
    proc = run_cli(["config", "show", "--command", "unlearn", "--checkpoint", checkpoint, "method.name=neggrad",
                    "forget.kind=random", "forget.size=20"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    tree = yaml.safe_load(proc.stdout)
    assert tree["seed"] == 3 and tree["model"]["options"] == {"width": 8, "feature_dim": 32}  # the checkpoint's
    assert tree["method"]["name"] == "neggrad" and tree["forget"]["size"] == 20
    assert tree["tracking"]["enabled"] is True  # not inherited from the checkpoint (pretrained with it off)


def test_evaluate_takes_checkpoint_as_an_option(tmp_path):
    checkpoint = pretrain_json(tmp_path, "train.epochs=1", *SMALL)["checkpoint"]
    out = tmp_path / "eval"
    # the override right after --checkpoint is an override, not a second checkpoint
    proc = run_cli(["evaluate", "--checkpoint", checkpoint, "forget.kind=random", "--metrics", "accuracy,landscape",
                    "--out", str(out), "--no-tracking", "--eval-option", "landscape_points=3",
                    "--eval-option", "landscape_samples=32", "forget.size=20"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    figures = [line.split("figure: ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("figure: ")]
    assert figures and all(Path(f).is_file() and f.endswith(".png") for f in figures)
    assert (out / "results.parquet").is_file()
    # the positional form still works; both at once is refused
    proc = run_cli(["evaluate", checkpoint, "--checkpoint", checkpoint, "--no-tracking"], tmp_path)
    assert proc.returncode == 2 and "two checkpoints" in proc.stderr


def test_pretrain_without_tracking_prints_no_run_id(tmp_path):
    proc = run_cli(["pretrain", "--no-tracking", f"output_dir={tmp_path / 'runs'}", "train.epochs=1", *SMALL],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint" in proc.stdout and "run_id" not in proc.stdout and "None" not in proc.stdout
