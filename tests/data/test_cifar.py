"""CIFAR loaders read torchvision's pickle format from files the test writes (no MD5 check)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from sharp_unlearn.config import DataConfig
from sharp_unlearn.data import build_dataset
from sharp_unlearn.data.cifar import SPECS
from sharp_unlearn.errors import ConfigError

PER_BATCH = 6  # 5 training batches -> 30 training images


def write_cifar(root, name: str, seed: int = 0, bytes_keys: bool = False):
    """Write a tiny data set in the exact on-disk layout torchvision uses; returns the arrays."""
    spec = SPECS[name]
    rng = np.random.default_rng(seed)
    folder = root / spec["folder"]
    folder.mkdir(parents=True)
    train_files = spec["train_files"]
    n_train = PER_BATCH * 5
    images = rng.integers(0, 256, size=(n_train, 3072), dtype=np.uint8)
    labels = rng.integers(0, spec["num_classes"], size=n_train).tolist()
    test_images = rng.integers(0, 256, size=(8, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, spec["num_classes"], size=8).tolist()
    per_file = n_train // len(train_files)

    def dump(path, data, lab):
        entry = {"data": data, spec["label_key"]: lab, "filenames": [f"img{i}.png" for i in range(len(lab))]}
        if name == "cifar100":
            entry["coarse_labels"] = [v // 5 for v in lab]
        if bytes_keys:  # the published files as Python 2 wrote them
            entry = {k.encode(): v for k, v in entry.items()}
        with open(path, "wb") as handle:
            pickle.dump(entry, handle)

    for k, file in enumerate(train_files):
        dump(folder / file, images[k * per_file:(k + 1) * per_file], labels[k * per_file:(k + 1) * per_file])
    dump(folder / spec["test_files"][0], test_images, test_labels)
    return (images.reshape(-1, 3, 32, 32), np.asarray(labels), test_images.reshape(-1, 3, 32, 32),
            np.asarray(test_labels))


def normalised(pixels: np.ndarray, name: str) -> torch.Tensor:
    mean = torch.tensor(SPECS[name]["mean"])[:, None, None]
    std = torch.tensor(SPECS[name]["std"])[:, None, None]
    return (torch.from_numpy(pixels).float() / 255.0 - mean) / std


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_reads_the_pickle_format_with_original_indices(tmp_path, name):
    images, labels, test_images, test_labels = write_cifar(tmp_path, name)
    bundle = build_dataset(DataConfig(name=name, root=str(tmp_path), options={"val_size": 7}), seed=0)
    assert bundle.num_classes == (10 if name == "cifar10" else 100)
    assert bundle.input_shape == (3, 32, 32)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (23, 7, 8)
    # train + val partition the original 30 images; each keeps its original position as index
    train_index = bundle.meta["train_index"]
    val_index = bundle.meta["val_index"]
    assert sorted(train_index.tolist() + val_index.tolist()) == list(range(30))
    for split, expected_images, expected_labels in ((bundle.train_eval, images, labels),
                                                    (bundle.val, images, labels),
                                                    (bundle.test, test_images, test_labels)):
        for pos in range(len(split)):
            x, y, index = split[pos]
            i = int(index)
            torch.testing.assert_close(x, normalised(expected_images[i], name))
            assert int(y) == expected_labels[i]
    assert np.array_equal(bundle.train_targets, labels[train_index])


def test_split_is_fixed_across_run_seeds_and_accepts_bytes_keys(tmp_path):
    write_cifar(tmp_path, "cifar10", bytes_keys=True)
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "cifar-10-batches-py"), options={"val_size": 5})
    a, b = build_dataset(cfg, seed=0), build_dataset(cfg, seed=5)
    assert np.array_equal(a.meta["val_index"], b.meta["val_index"])


def test_augmentation_only_on_train_and_deterministic(tmp_path):
    images, _, _, _ = write_cifar(tmp_path, "cifar10")
    bundle = build_dataset(DataConfig(name="cifar10", root=str(tmp_path), augment=True,
                                      options={"val_size": 5}), seed=0)
    assert bundle.train.augment and not bundle.train_eval.augment and not bundle.test.augment
    torch.manual_seed(1)
    first = torch.stack([bundle.train[0][0] for _ in range(8)])
    torch.manual_seed(1)
    again = torch.stack([bundle.train[0][0] for _ in range(8)])
    torch.testing.assert_close(first, again)
    clean = bundle.train_eval[0][0]
    torch.testing.assert_close(clean, normalised(images[int(bundle.train[0][2])], "cifar10"))
    assert any(not torch.equal(view, clean) for view in first)  # crops/flips change the image
    # every view is one of the 9x9x2 crops (4-pixel zero padding) / flips, normalised after padding
    raw = torch.from_numpy(images[int(bundle.train[0][2])]).float() / 255.0
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
    mean = torch.tensor(SPECS["cifar10"]["mean"])[:, None, None]
    std = torch.tensor(SPECS["cifar10"]["std"])[:, None, None]
    candidates = [(crop.flip(-1) if flip else crop) for top in range(9) for left in range(9)
                  for crop in [padded[:, top:top + 32, left:left + 32]] for flip in (False, True)]
    candidates = torch.stack([(c - mean) / std for c in candidates])
    for view in first:
        assert (candidates - view).abs().flatten(1).max(1).values.min() < 1e-5


def test_label_noise_is_recorded_by_position_and_index(tmp_path):
    _, labels, _, _ = write_cifar(tmp_path, "cifar10")
    bundle = build_dataset(DataConfig(name="cifar10", root=str(tmp_path), label_noise=0.2,
                                      options={"val_size": 5}), seed=3)
    flipped = bundle.meta["flipped"]
    assert len(flipped) == 5
    stable = bundle.meta["train_index"]
    assert np.array_equal(np.flatnonzero(bundle.train_targets != labels[stable]), flipped)
    assert np.array_equal(bundle.meta["flipped_index"], stable[flipped])
    assert int(bundle.train_eval[int(flipped[0])][1]) == bundle.train_targets[flipped[0]]


def test_missing_root_or_files_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="needs data.root"):
        build_dataset(DataConfig(name="cifar10"), seed=0)
    with pytest.raises(ConfigError, match=r"no cifar-10-batches-py/.*data_batch_1"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path / "nowhere")), seed=0)
    write_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(ConfigError, match="lacks test"):
        build_dataset(DataConfig(name="cifar100", root=str(tmp_path)), seed=0)
    write_cifar(tmp_path, "cifar10")
    with pytest.raises(ConfigError, match="val_size=30"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path), options={"val_size": 30}), seed=0)


def test_cli_reports_a_missing_root_with_exit_code_2(tmp_path, capsys):
    from sharp_unlearn.cli import main

    code = main(["pretrain", "--quiet", "--no-tracking", "data.name=cifar10", f"data.root={tmp_path / 'none'}",
                 f"output_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


class _Trap:
    """Unpickling calls ``call(*args)``: what a crafted ``data_batch_1`` does to run code."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("trap", ["os.system", "builtins.eval", "class"])
def test_a_crafted_pickle_is_refused_without_running_code(tmp_path, trap):
    import collections
    import os

    write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "marker"
    payload = {"os.system": _Trap(os.system, f"touch '{marker}'"),
               "builtins.eval": _Trap(eval, f"open({str(marker)!r}, 'w').close()"),
               "class": collections.OrderedDict()}[trap]
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "wb") as handle:
        pickle.dump({"data": np.zeros((6, 3072), np.uint8), "labels": [0] * 6, "x": payload}, handle)
    with pytest.raises(ConfigError, match="data_batch_1.*names (posix|os|builtins|collections)"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path), options={"val_size": 5}), seed=0)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_every_pickle_protocol_of_the_real_format_loads(tmp_path, protocol):
    images, labels, _, _ = write_cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    for file in SPECS["cifar10"]["train_files"] + SPECS["cifar10"]["test_files"]:
        entry = pickle.loads((folder / file).read_bytes())
        entry["labels"] = [np.int64(v) for v in entry["labels"]]  # numpy scalars are numbers too
        (folder / file).write_bytes(pickle.dumps(entry, protocol=protocol))
    bundle = build_dataset(DataConfig(name="cifar10", root=str(tmp_path), options={"val_size": 5}), seed=0)
    x, y, index = bundle.train_eval[0]
    torch.testing.assert_close(x, normalised(images[int(index)], "cifar10"))
    assert int(y) == labels[int(index)]
    assert bundle.meta["official_release"] is False  # written here, not the published files
