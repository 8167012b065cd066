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


def _digits_shards(out):
    from sharp_unlearn.config import DataConfig
    from sharp_unlearn.data.parquet import convert_to_parquet

    convert_to_parquet(DataConfig(name="digits"), out, shard_size=1000)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.slow
def test_a_failing_convert_with_overwrite_keeps_the_previous_shards(tmp_path):
    out = tmp_path / "shards"
    previous = _digits_shards(out)
    before = snapshot(tmp_path)
    # digits' values are k/16, not k/255: png is refused after the data set was read and shards begun
    proc = run_cli(["convert", "--overwrite", "--out", str(out), "--format", "png", "data.name=digits"], tmp_path)
    assert_exit_2_one_line(proc, "convert", "image_format=array")
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == previous
    assert snapshot(tmp_path) == before  # no temporary folder left beside it either


@pytest.mark.slow
@pytest.mark.parametrize("relation", ["is", "is inside", "contains"])
def test_converting_onto_the_source_is_refused_and_the_source_kept(tmp_path, relation):
    source = tmp_path / "outer" / "inner"
    original = _digits_shards(source)
    out = {"is": source, "is inside": source / "sub", "contains": tmp_path / "outer"}[relation]
    before = snapshot(tmp_path)
    proc = run_cli(["convert", "--overwrite", "--out", str(out), "data.name=parquet", f"data.root={source}"],
                   tmp_path)
    assert_exit_2_one_line(proc, "convert", f"{relation} the source", str(source))
    assert {p.name: p.read_bytes() for p in sorted(source.iterdir())} == original
    assert snapshot(tmp_path) == before
