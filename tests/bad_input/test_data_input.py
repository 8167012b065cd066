"""Bad data input, as a user meets it: a real process exits 2 with one line naming the file, runs no code
from the data, writes nothing, and never destroys the data it was given."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from bad_input.harness import SMALL, assert_exit_2_one_line, run_cli, snapshot


class _Trap:
    """Unpickling calls ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_cifar10(root, trap_marker=None):
    """A tiny CIFAR-10 in torchvision's layout; with ``trap_marker`` data_batch_1 tries to create that file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for file in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        if trap_marker is not None and file == "data_batch_1":
            entry["batch_label"] = _Trap(f"touch '{trap_marker}'")
        (folder / file).write_bytes(pickle.dumps(entry))
    return folder


@pytest.mark.slow
def test_a_booby_trapped_cifar_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    write_cifar10(tmp_path / "data", trap_marker=marker)
    before = snapshot(tmp_path)
    proc = run_cli(["pretrain", "--no-tracking", f"output_dir={tmp_path / 'runs'}", "data.name=cifar10",
                    f"data.root={tmp_path / 'data'}", "data.options={val_size: 4}", *SMALL], tmp_path)
    assert_exit_2_one_line(proc, "pretrain", "data_batch_1", "system")
    assert not marker.exists()
    assert snapshot(tmp_path) == before
