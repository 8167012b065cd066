"""Your own model on the command line: one-line exit-2 errors, and ``unlearn --checkpoint`` of a state dict
saved outside this tool."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sharp_unlearn.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
USER_MODULE = textwrap.dedent("""
    from torch import nn

    def small_net(num_classes, hidden=16):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
""")


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(cwd)]))
    return subprocess.run([sys.executable, "-m", "sharp_unlearn", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, command: str, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"sharp-unlearn {command}: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "own_models.py").write_text(USER_MODULE)
    return tmp_path


def _foreign_state(classes: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, classes))
    return net.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("overrides, needles", [
    (["model.name=torchvision:resnet181"], ["model.name='torchvision:resnet181'", "resnet18"]),
    (["model.name=torchvision:resnet18", "model.weights=missing/resnet18.pth"],
     ["model.weights='missing/resnet18.pth' does not exist", "state-dict file"]),
    (["model.name=python:own_models:no_such_fn"], ["has no attribute 'no_such_fn'"]),
])
def test_pretrain_bad_model_is_one_line_exit_2(workdir, overrides, needles):
    proc = run_cli(["pretrain", "--no-tracking", f"output_dir={workdir / 'runs'}", "train.epochs=1", *overrides],
                   workdir)
    assert_one_line_error(proc, "pretrain", *needles)


@pytest.mark.slow
def test_unlearn_a_foreign_checkpoint(workdir):
    torch.save({"state_dict": _foreign_state(10)}, workdir / "model.pt")
    common = ["--no-tracking", "--json", f"output_dir={workdir / 'runs'}", "model.name=python:own_models:small_net",
              "train.epochs=1", "train.checkpoint_every=0", "forget.kind=random", "forget.size=40",
              "method.name=sharp_minmax", "optimizer.name=sam", "optimizer.lr=0.01"]
    proc = run_cli(["unlearn", "--checkpoint", "model.pt", *common], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = list((workdir / "runs" / "imported").glob("model-*.pt"))
    assert len(imported) == 1
    state = load_checkpoint(imported[0])
    assert state["imported_from"] == str((workdir / "model.pt").resolve()) and len(state["imported_sha256"]) == 64
    assert state["config"]["model"]["name"] == "python:own_models:small_net"
    assert torch.equal(state["model"]["module.3.weight"], _foreign_state(10)["3.weight"])  # the file's weights
    summary = json.loads(proc.stdout)
    assert Path(summary["checkpoint"]).is_file() and Path(summary["reference_checkpoint"]).is_file()

    torch.save(_foreign_state(4), workdir / "four.pt")  # a 4-class head on 10-class digits cannot be unlearned
    proc = run_cli(["unlearn", "--checkpoint", "four.pt", *common], workdir)
    assert_one_line_error(proc, "unlearn", "four.pt", "head of 4 classes but the data have 10")
