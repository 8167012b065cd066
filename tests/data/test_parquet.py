"""Parquet shards: exact round trips (arrays and PNG), metadata, errors, and the convert command."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sharp_unlearn.config import DataConfig
from sharp_unlearn.data import DatasetBundle, IndexedTensorDataset, build_dataset
from sharp_unlearn.data.parquet import convert_to_parquet
from sharp_unlearn.errors import ConfigError


def all_items(dataset):
    xs, ys, idx = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(xs), torch.stack(ys), torch.stack(idx)


def assert_same_split(a, b):
    xa, ya, ia = all_items(a)
    xb, yb, ib = all_items(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)


def test_digits_round_trip_is_exact_across_shards(tmp_path):
    source = build_dataset(DataConfig(name="digits", label_noise=0.05), seed=2)
    summary = convert_to_parquet(source, tmp_path, shard_size=500)
    assert summary["rows"] == {"train": 1257, "val": 180, "test": 360}
    assert summary["shards"] == {"train": 3, "val": 1, "test": 1}
    assert sorted(p.name for p in tmp_path.glob("train-*.parquet")) == [
        "train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    meta = json.loads(pq.read_schema(tmp_path / "val-00000-of-00001.parquet").metadata[b"sharp_unlearn"])
    assert meta["shape"] == [1, 8, 8] and meta["format"] == "array" and meta["num_classes"] == 10

    loaded = build_dataset(DataConfig(name="parquet", root=str(tmp_path)), seed=0)
    assert loaded.input_shape == (1, 8, 8) and loaded.num_classes == 10
    for split in ("train_eval", "val", "test"):
        assert_same_split(getattr(source, split), getattr(loaded, split))
    # the label flips baked into the labels at conversion are recorded, and not applied twice
    assert np.array_equal(loaded.meta["source_flipped_index"], source.meta["flipped"])
    assert np.array_equal(loaded.train_targets, source.train_targets)
    assert len(loaded.meta["flipped"]) == 0


def test_png_round_trip_of_raw_cifar_pixels_keeps_augmentation(tmp_path):
    from test_cifar import write_cifar  # this folder's CIFAR pickle writer (pytest puts it on sys.path)

    write_cifar(tmp_path / "raw", "cifar10")
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "raw"), options={"val_size": 6})
    source = build_dataset(cfg, seed=0)
    for fmt in ("png", "array"):
        out = tmp_path / fmt
        convert_to_parquet(cfg, out, shard_size=10, image_format=fmt)
        loaded = build_dataset(DataConfig(name="parquet", root=str(out), augment=True), seed=0)
        for split in ("train_eval", "val", "test"):
            assert_same_split(getattr(source, split), getattr(loaded, split))
        assert np.array_equal(loaded.meta["train_index"], source.meta["train_index"])
        # the source's training augmentation comes along (recorded in the schema metadata)
        assert loaded.train.augment and not loaded.train_eval.augment
        torch.manual_seed(4)
        a = loaded.train[3][0]
        torch.manual_seed(4)
        assert torch.equal(a, source.train[3][0])


def test_png_of_k_over_255_values_is_exact_and_other_values_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, size=(12, 3, 5, 7)).astype(np.float32) / 255.0)
    labels = torch.from_numpy(rng.integers(0, 4, size=12))
    index = torch.arange(100, 112)
    split = IndexedTensorDataset(pixels, labels, index)
    bundle = DatasetBundle("toy", split, split, split, split, 4, (3, 5, 7), labels.numpy())
    convert_to_parquet(bundle, tmp_path / "ok", shard_size=5, image_format="png")
    loaded = build_dataset(DataConfig(name="parquet", root=str(tmp_path / "ok")), seed=0)
    assert_same_split(split, loaded.test)
    assert loaded.input_shape == (3, 5, 7)

    digits = build_dataset(DataConfig(name="digits"), seed=0)  # values k/16: not k/255
    with pytest.raises(ConfigError, match="image_format=array"):
        convert_to_parquet(digits, tmp_path / "lossy", image_format="png")
    assert list((tmp_path / "lossy").glob("*.parquet")) == []  # nothing half-written is left behind


def test_label_noise_on_read_and_missing_splits(tmp_path):
    source = build_dataset(DataConfig(name="digits"), seed=0)
    convert_to_parquet(source, tmp_path, shard_size=2000)
    noisy = build_dataset(DataConfig(name="parquet", root=str(tmp_path), label_noise=0.1), seed=7)
    flipped = noisy.meta["flipped"]
    assert len(flipped) == round(0.1 * 1257)
    assert np.array_equal(np.flatnonzero(noisy.train_targets != source.train_targets), flipped)
    assert int(noisy.train[int(flipped[0])][1]) == noisy.train_targets[flipped[0]]

    for path in tmp_path.glob("val-*.parquet"):
        path.unlink()
    fallback = build_dataset(DataConfig(name="parquet", root=str(tmp_path)), seed=0)
    assert fallback.meta["val_is_test"] and len(fallback.val) == 360

    with pytest.raises(ConfigError, match="already holds shards"):
        convert_to_parquet(source, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no train-"):
        build_dataset(DataConfig(name="parquet", root=str(tmp_path / "empty")), seed=0)
    with pytest.raises(ConfigError, match="needs data.root"):
        build_dataset(DataConfig(name="parquet"), seed=0)


def test_signal_noise_arrays_of_any_shape(tmp_path):
    source = build_dataset(DataConfig(name="signal_noise", options={"d": 16, "n": 20, "n_val": 5, "n_test": 6}),
                           seed=0)
    convert_to_parquet(source, tmp_path, shard_size=7)
    loaded = build_dataset(DataConfig(name="parquet", root=str(tmp_path)), seed=0)
    assert loaded.input_shape == (2, 16)
    for split in ("train_eval", "val", "test"):
        assert_same_split(getattr(source, split), getattr(loaded, split))


def test_convert_command(tmp_path, capsys):
    from sharp_unlearn.cli import main

    out = tmp_path / "shards"
    code = main(["convert", "--json", "--out", str(out), "--shard-size", "600", "data.name=digits"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == {"train": 1257, "val": 180, "test": 360}
    assert result["shards"]["train"] == 3
    loaded = build_dataset(DataConfig(name="parquet", root=str(out)), seed=0)
    assert_same_split(build_dataset(DataConfig(name="digits"), seed=0).test, loaded.test)
    # a second run refuses to mix shards unless asked to overwrite
    assert main(["convert", "--quiet", "--out", str(out), "data.name=digits"]) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert main(["convert", "--quiet", "--overwrite", "--out", str(out), "--shard-size", "5000",
                 "data.name=digits"]) == 0
    assert len(list(out.glob("train-*.parquet"))) == 1
    assert main(["convert", "--out", str(out), "--format", "png", "data.name=cifar10",
                 f"data.root={tmp_path / 'missing'}"]) == 2


def test_overwrite_swaps_in_a_complete_folder_and_an_interrupted_one_changes_nothing(tmp_path, monkeypatch):
    import sharp_unlearn.data.parquet as parquet

    source = build_dataset(DataConfig(name="digits"), seed=0)
    out = tmp_path / "a" / "shards"
    convert_to_parquet(source, out, shard_size=500)
    previous = {p.name: p.read_bytes() for p in out.iterdir()}

    real = parquet._write_split

    def interrupted(bundle, split, *args):
        if split == "val":  # the training shards are already written by then
            raise KeyboardInterrupt
        return real(bundle, split, *args)

    monkeypatch.setattr(parquet, "_write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_to_parquet(source, out, shard_size=2000, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    assert sorted(p.name for p in out.parent.iterdir()) == ["shards"]  # no temporary folder left
    with pytest.raises(KeyboardInterrupt):  # parents created for a new output go again too
        convert_to_parquet(source, tmp_path / "new" / "deep" / "shards")
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(parquet, "_write_split", real)

    convert_to_parquet(source, out, shard_size=2000, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00001.parquet", "val-00000-of-00001.parquet"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["shards"]

    # a folder of other files gains the shards and keeps its files; overwriting such a folder is refused
    (out.parent / "mixed").mkdir()
    (out.parent / "mixed" / "README").write_text("keep me")
    convert_to_parquet(source, out.parent / "mixed", shard_size=2000)
    assert (out.parent / "mixed" / "README").read_text() == "keep me"
    assert len(list((out.parent / "mixed").glob("*.parquet"))) == 3
    with pytest.raises(ConfigError, match="'README' besides the shards"):
        convert_to_parquet(source, out.parent / "mixed", overwrite=True)
    assert (out.parent / "mixed" / "README").read_text() == "keep me"


def test_repeated_indices_and_null_labels_are_refused_naming_the_shard(tmp_path):
    import pyarrow as pa

    source = build_dataset(DataConfig(name="digits"), seed=0)
    convert_to_parquet(source, tmp_path, shard_size=700)
    second = tmp_path / "train-00001-of-00002.parquet"
    table = pq.read_table(second)
    index = table.column("index").to_numpy().copy()
    index[3] = int(pq.read_table(tmp_path / "train-00000-of-00002.parquet").column("index")[0].as_py())
    pq.write_table(table.set_column(2, "index", pa.array(index)), second)
    with pytest.raises(ConfigError, match=r"train-00001-of-00002.parquet' row 3: column 'index' repeats"):
        build_dataset(DataConfig(name="parquet", root=str(tmp_path)), seed=0)
    labels = pa.array([None] + table.column("label").to_pylist()[1:], pa.int64())
    pq.write_table(table.set_column(1, "label", labels), second)
    with pytest.raises(ConfigError, match=r"train-00001-of-00002.parquet': column 'label' is empty \(null\) in row 0"):
        build_dataset(DataConfig(name="parquet", root=str(tmp_path)), seed=0)


def test_an_unreadable_png_is_a_config_error_naming_split_and_row(tmp_path):
    import pyarrow as pa

    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, size=(6, 3, 4, 4)).astype(np.float32) / 255.0)
    split = IndexedTensorDataset(pixels, torch.zeros(6, dtype=torch.long), torch.arange(6))
    bundle = DatasetBundle("toy", split, split, split, split, 2, (3, 4, 4), np.zeros(6, dtype=np.int64))
    convert_to_parquet(bundle, tmp_path, image_format="png")
    shard = tmp_path / "test-00000-of-00001.parquet"
    table = pq.read_table(shard)
    blobs = table.column("image").to_pylist()
    blobs[4] = blobs[4][:20]  # truncated
    pq.write_table(table.set_column(0, "image", pa.array(blobs, pa.binary())), shard)
    loaded = build_dataset(DataConfig(name="parquet", root=str(tmp_path)), seed=0)
    assert loaded.test[3][0].shape == (3, 4, 4)
    with pytest.raises(ConfigError, match=r"/test row 4 \(index 4\): column 'image' is not a PNG"):
        loaded.test[4]
