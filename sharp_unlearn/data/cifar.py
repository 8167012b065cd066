"""CIFAR-10 / CIFAR-100 from torchvision's on-disk pickles, read without checksums.

Layout under ``data.root`` (or ``data.root`` itself being the folder):

- ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
  each a pickle with ``data`` (uint8 ``[N, 3072]``, channel-major) and ``labels``;
- ``cifar-100-python/``: ``train``, ``test`` with ``data`` and ``fine_labels``.

torchvision's own classes refuse files whose MD5 differs from the published
one, which rules out files written by tests or re-packed mirrors; this reader
only needs the format. Its safety does not rest on the checksum: the pickles
are loaded by a restricted unpickler that admits only what the format holds
(numpy arrays, numbers, strings, bytes, lists, dicts, tuples), so a crafted
file cannot run code. Files whose MD5 is the published one are recorded as the
official release (``meta["official_release"]``). ``data.download=true`` calls
torchvision's downloader, which does verify the checksums of what it fetches.

Splits: a fixed, seeded validation split (option ``val_size``, 5000) is carved
out of the 50 000 training images; the rest is ``train``. Every example keeps
its original training position (0..49 999) as its stable index, so published
per-example files (Feldman & Zhang's ``tr_mem``) line up; ``meta["train_index"]``
maps training positions to those indices. Test examples are indexed 0..9 999.

Training augmentation (``data.augment``): 4-pixel zero padding + random 32x32
crop and a random horizontal flip; every split is normalised with the data
set's channel means and standard deviations. ``train_eval`` is the training
split without augmentation.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sharp_unlearn.data.base import DATASETS, DatasetBundle, flip_labels
from sharp_unlearn.errors import ConfigError

#: fixed split seed: the validation examples do not change with the run seed
SPLIT_SEED = 20260102

SPECS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train_files": [f"data_batch_{i}" for i in range(1, 6)],
        "test_files": ["test_batch"],
        "label_key": "labels",
        "num_classes": 10,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "torchvision": "CIFAR10",
        # the published MD5s (as torchvision checks them on download)
        "md5": {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
                "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"},
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train_files": ["train"],
        "test_files": ["test"],
        "label_key": "fine_labels",
        "num_classes": 100,
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
        "torchvision": "CIFAR100",
        "md5": {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
    },
}
OPTIONS = ("val_size",)


def crop_flip(image: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Zero-pad by ``pad``, take a random crop of the original size, flip half the time.

    Draws from torch's global generator, which the training loop seeds per epoch
    (and DataLoader per worker), so augmented runs stay deterministic and resumable.
    """
    h, w = image.shape[-2:]
    padded = torch.nn.functional.pad(image, (pad,) * 4)
    top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
    image = padded[..., top:top + h, left:left + w]
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
    return image


class ImageTensorDataset(Dataset):
    """Images ``[N, C, H, W]`` in memory -> normalised float ``(x, y, index)``.

    ``x = (pixels / scale - mean) / std``: uint8 images use ``scale=255``; float
    images stored as-is use ``scale=1`` and no ``mean``/``std``. With ``augment``
    the training transform (pad + random crop, horizontal flip) runs before
    normalisation, as torchvision's usual CIFAR pipeline does.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 augment: bool = False, pad: int = 4, scale: float = 255.0):
        if not (len(images) == len(labels) == len(index)):
            raise ValueError(f"images ({len(images)}), labels ({len(labels)}) and index ({len(index)}) differ")
        self.images = images
        self.y = labels.long()
        self.index = index.long()
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.augment = augment
        self.pad = pad
        self.scale = float(scale)

    def __len__(self) -> int:
        return len(self.y)

    def pixels(self, i: int) -> torch.Tensor:
        return self.images[i]

    def __getitem__(self, i: int):
        image = self.pixels(i).float()
        if self.scale != 1.0:
            image = image / self.scale
        if self.augment:
            image = crop_flip(image, self.pad)
        if self.mean is not None:
            image = (image - self.mean) / self.std
        return image, self.y[i], self.index[i]

    def with_augment(self, augment: bool) -> ImageTensorDataset:
        """The same examples (shared storage) with augmentation on or off."""
        twin = type(self).__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.augment = augment
        return twin

    @property
    def targets(self) -> np.ndarray:
        return self.y.numpy()


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes`` (always latin1); nothing else."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not part of the format")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only callables a CIFAR pickle may name: numpy array / dtype / scalar reconstruction.

    The published files (Python 2) name ``numpy.core.multiarray._reconstruct``; numpy 2 writes
    ``numpy._core...``; protocol 5 uses ``numeric._frombuffer``. Each name maps straight to the
    object, so no other module is ever imported on the pickle's behalf.
    """
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Refuses every global outside :func:`_allowed_globals` (``os.system``, ``builtins.eval``, classes...)."""

    def __init__(self, handle, **kwargs):
        super().__init__(handle, **kwargs)
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR pickle never holds "
                                         "(only numpy arrays, numbers, strings, lists and dicts)") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent id, which a CIFAR pickle never holds")


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            # latin1: the published pickles were written by Python 2
            entry = _CifarUnpickler(handle, encoding="latin1").load()
    # a crafted pickle can make the reconstruction calls themselves raise almost anything
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{str(path)!r} is not a readable CIFAR pickle: {exc}") from None
    if not isinstance(entry, dict):
        raise ConfigError(f"{str(path)!r} holds a {type(entry).__name__}; expected a CIFAR pickle (a dict "
                          f"with 'data' and {label_key!r})")
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or label_key not in entry:
        raise ConfigError(f"{str(path)!r} lacks the keys 'data' and {label_key!r}; found {sorted(entry)}")
    try:
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(f"{str(path)!r}: 'data' and {label_key!r} are not uint8 pixels and integer labels: "
                          f"{exc}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ConfigError(f"{str(path)!r} holds data of shape {data.shape} with {len(labels)} labels; "
                          "expected [N, 3072] uint8 and N labels")
    return data.reshape(-1, 3, 32, 32), labels


def _folder(name: str, cfg) -> Path:
    spec = SPECS[name]
    if cfg.root is None:
        raise ConfigError(f"data set {name!r} needs data.root (a folder holding {spec['folder']}/), "
                          "or data.download=true with data.root set to where to put it")
    root = Path(cfg.root).expanduser()
    if cfg.download:
        from torchvision import datasets as tv_datasets

        cls = getattr(tv_datasets, spec["torchvision"])
        for train in (True, False):  # torchvision verifies the published MD5s of what it fetches
            cls(str(root), train=train, download=True)
    folder = root if root.name == spec["folder"] else root / spec["folder"]
    expected = spec["train_files"] + spec["test_files"]
    if not folder.is_dir():
        raise ConfigError(f"data.root={str(cfg.root)!r} has no {spec['folder']}/ folder; expected "
                          f"torchvision's {name} pickles ({', '.join(expected)}) there, "
                          "or set data.download=true to fetch them")
    missing = [f for f in expected if not (folder / f).is_file()]
    if missing:
        raise ConfigError(f"{str(folder)!r} lacks {', '.join(missing)}; expected {', '.join(expected)}")
    return folder


def read_cifar(name: str, folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test arrays (images uint8 ``[N, 3, 32, 32]``, labels) in file order."""
    spec = SPECS[name]
    parts = [_read_batch(folder / f, spec["label_key"]) for f in spec["train_files"]]
    test_x, test_y = _read_batch(folder / spec["test_files"][0], spec["label_key"])
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    for split, labels in (("train", train_y), ("test", test_y)):
        if len(labels) and (labels.min() < 0 or labels.max() >= spec["num_classes"]):
            raise ConfigError(f"{name} {split} labels span {labels.min()}..{labels.max()}; "
                              f"expected 0..{spec['num_classes'] - 1}")
    return train_x, train_y, test_x, test_y


def official_release(name: str, folder: Path) -> bool:
    """Whether every file is the published one (MD5). Files that differ are still read (tests and
    re-packed mirrors write the same format): the restricted unpickler, not the checksum, keeps them safe."""
    return all(_md5(folder / file) == md5 for file, md5 in SPECS[name]["md5"].items())


def _val_size(cfg, total: int) -> int:
    unknown = sorted(set(cfg.options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"data.options.{unknown[0]} is not an option of {cfg.name}; "
                          f"expected one of: {', '.join(OPTIONS)}")
    value = cfg.options.get("val_size", 5000)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < total:
        raise ConfigError(f"data.options.val_size={value!r} is out of range; "
                          f"expected an integer in [0, {total}) (the training set has {total} images)")
    return value


def build_cifar(name: str, cfg, seed: int) -> DatasetBundle:
    spec = SPECS[name]
    folder = _folder(name, cfg)
    images, labels, test_images, test_labels = read_cifar(name, folder)
    val_size = _val_size(cfg, len(labels))
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    val_idx = np.sort(order[:val_size])
    train_idx = np.sort(order[val_size:])

    train_y, flipped = flip_labels(labels[train_idx], cfg.label_noise, spec["num_classes"], seed)

    def make(idx_images, idx_labels, index, augment=False):
        return ImageTensorDataset(torch.from_numpy(np.ascontiguousarray(idx_images)),
                                  torch.from_numpy(np.asarray(idx_labels)), torch.from_numpy(np.asarray(index)),
                                  spec["mean"], spec["std"], augment=augment)

    train_eval = make(images[train_idx], train_y, train_idx)
    val = make(images[val_idx], labels[val_idx], val_idx)
    test = make(test_images, test_labels, np.arange(len(test_labels)))
    return DatasetBundle(
        name=name, train=train_eval.with_augment(bool(cfg.augment)), train_eval=train_eval, val=val, test=test,
        num_classes=spec["num_classes"], input_shape=(3, 32, 32), train_targets=train_y,
        meta={
            # positions in the training split whose labels were flipped (digits' convention);
            # their stable indices are train_index[flipped]
            "flipped": flipped,
            "flipped_index": train_idx[flipped].astype(np.int64),
            "train_index": train_idx.astype(np.int64),
            "val_index": val_idx.astype(np.int64),
            "clean_targets": labels[train_idx],
            "mean": spec["mean"], "std": spec["std"], "augmentation": "crop_flip",
            "folder": str(folder), "official_release": official_release(name, folder),
        },
    )


@DATASETS.register("cifar10")
def build_cifar10(cfg, seed: int) -> DatasetBundle:
    return build_cifar("cifar10", cfg, seed)


@DATASETS.register("cifar100")
def build_cifar100(cfg, seed: int) -> DatasetBundle:
    return build_cifar("cifar100", cfg, seed)
