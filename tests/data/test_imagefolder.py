"""ImageNet-style class folders: classes, sorted indices, transforms, missing folders."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sharp_unlearn.config import DataConfig
from sharp_unlearn.data import build_dataset
from sharp_unlearn.errors import ConfigError

COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}


def write_tree(root, splits=("train", "val"), per_class=3, size=(20, 14)):
    """Solid-colour PNGs (one colour per class) so the label can be read off the pixels."""
    for split in splits:
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                # written in reverse order: the index must follow the sorted names, not creation order
                Image.new("RGB", size, colour).save(folder / f"{per_class - k:03d}.png")


def test_reads_classes_and_indexes_by_sorted_path(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    bundle = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), augment=False,
                                      options={"image_size": 8}), seed=0)
    assert bundle.num_classes == 3 and bundle.meta["classes"] == ["cat", "dog", "emu"]
    assert bundle.input_shape == (3, 8, 8)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (9, 9, 9)
    assert bundle.meta["test_is_val"] is True
    assert [p.name for p in bundle.train_eval.paths[:3]] == ["001.png", "002.png", "003.png"]
    mean = torch.tensor((0.485, 0.456, 0.406))
    std = torch.tensor((0.229, 0.224, 0.225))
    for pos in range(9):
        x, y, index = bundle.train_eval[pos]
        assert int(index) == pos and int(y) == pos // 3
        assert x.shape == (3, 8, 8)
        colour = torch.tensor(COLOURS[bundle.meta["classes"][int(y)]], dtype=torch.float32) / 255
        torch.testing.assert_close(x[:, 4, 4], (colour - mean) / std, atol=1e-4, rtol=0)
    assert np.array_equal(bundle.train_targets, np.repeat([0, 1, 2], 3))


def test_optional_test_folder_augmentation_and_label_noise(tmp_path):
    write_tree(tmp_path, splits=("train", "val", "test"), per_class=4)
    bundle = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), augment=True, label_noise=0.25,
                                      options={"image_size": 8}), seed=1)
    assert bundle.meta["test_is_val"] is False and len(bundle.test) == 12
    assert len(bundle.meta["flipped"]) == 3
    assert np.array_equal(np.flatnonzero(bundle.train_targets != bundle.meta["clean_targets"]),
                          bundle.meta["flipped"])
    x, y, index = bundle.train[5]
    assert x.shape == (3, 8, 8) and int(index) == 5 and int(y) == bundle.train_targets[5]
    assert bundle.train.transform is not bundle.train_eval.transform


def test_missing_folders_and_unknown_val_classes(tmp_path):
    with pytest.raises(ConfigError, match="needs data.root"):
        build_dataset(DataConfig(name="imagefolder"), seed=0)
    write_tree(tmp_path, splits=("train",))
    with pytest.raises(ConfigError, match="no val/ folder"):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), seed=0)
    write_tree(tmp_path, splits=("val",))
    (tmp_path / "val" / "yak").mkdir()
    with pytest.raises(ConfigError, match="'yak'"):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), seed=0)
