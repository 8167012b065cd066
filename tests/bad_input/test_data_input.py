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


def write_shard(path, images, labels, num_classes=10, start=0):
    """One shard in the on-disk format ``convert`` writes: 1x8x8 float32 arrays, label, index."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = pa.array(np.asarray(images, dtype=np.float32).reshape(-1))
    meta = {"version": 1, "format": "array", "source": "test", "dtype": "float32", "shape": [1, 8, 8],
            "num_classes": num_classes, "mean": None, "std": None, "augmentation": "none"}
    table = pa.table({"image": pa.FixedSizeListArray.from_arrays(flat, 64), "label": labels,
                      "index": pa.array(range(start, start + len(images)), pa.int64())})
    pq.write_table(table.replace_schema_metadata({b"sharp_unlearn": json.dumps(meta).encode()}), path)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["string labels", "label out of range", "zero rows", "NaN pixels"])
def test_bad_parquet_is_refused_before_training_naming_the_file(tmp_path, case):
    import pyarrow as pa

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    images = rng.random((20, 64)).astype(np.float32)
    labels = pa.array(rng.integers(0, 10, size=20), pa.int64())
    write_shard(data / "val-00000-of-00001.parquet", images, labels)
    bad = data / "train-00001-of-00002.parquet"
    write_shard(data / "train-00000-of-00002.parquet", images, labels)
    needles = {"string labels": ["'label'", "string", "'3'"], "label out of range": ["'label'", "holds 10", "0..9"],
               "zero rows": ["zero rows"], "NaN pixels": ["'image'", "nan", "row 2"]}[case]
    if case == "string labels":
        write_shard(bad, images, pa.array([str(v) for v in [3] * 20]), start=20)
    elif case == "label out of range":
        write_shard(bad, images, pa.array([1] * 5 + [10] * 15, pa.int64()), start=20)
    elif case == "zero rows":
        write_shard(bad, images[:0], pa.array([], pa.int64()))
    else:
        images = images.copy()
        images[2, 7] = np.nan
        write_shard(bad, images, labels, start=20)
    before = snapshot(tmp_path)
    proc = run_cli(["pretrain", "--no-tracking", f"output_dir={tmp_path / 'runs'}", "data.name=parquet",
                    f"data.root={data}", "train.epochs=1", *SMALL], tmp_path)
    assert_exit_2_one_line(proc, "pretrain", bad.name, *needles)
    assert snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["not an image", "truncated"])
def test_a_corrupt_image_in_an_imagefolder_is_named(tmp_path, damage):
    from PIL import Image

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (data / split / name).mkdir(parents=True)
            for k in range(3):
                pixels = rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)  # noise: a long JPEG body
                Image.fromarray(pixels).save(data / split / name / f"{k}.jpg", quality=95)
    bad = data / "train" / "dog" / "1.jpg"
    body = bad.read_bytes()
    bad.write_bytes(b"this is not an image" if damage == "not an image" else body[:int(len(body) * 0.6)])
    before = snapshot(tmp_path)
    proc = run_cli(["pretrain", "--no-tracking", f"output_dir={tmp_path / 'runs'}", "data.name=imagefolder",
                    f"data.root={data}", "data.options={image_size: 8}", "train.epochs=1", *SMALL], tmp_path)
    assert_exit_2_one_line(proc, "pretrain", str(bad), "not a readable image")
    assert snapshot(tmp_path) == before
