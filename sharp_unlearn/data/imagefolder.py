"""ImageNet-style class folders: ``root/train/<class>/*.jpg``, ``root/val/<class>/...``.

``root/test`` is optional; without it the validation folder doubles as the
test split (ImageNet's usual arrangement, since its test labels are private).
Classes are the sorted sub-folder names of ``train``; ``val``/``test`` may not
introduce classes ``train`` lacks. An example's stable index is its position
in the split's sorted file list (sorted by ``class/file`` path), so it does not
depend on the file system's listing order.

Transforms: training with ``data.augment``: random resized crop to
``image_size`` and a horizontal flip; otherwise (and for ``train_eval``, val,
test) resize the short side to ``image_size * 8/7`` then center-crop. All are
normalised with the ImageNet channel statistics (options ``mean``, ``std``).
Options: ``image_size`` (224), ``mean``, ``std``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sharp_unlearn.data.base import DATASETS, DatasetBundle, flip_labels
from sharp_unlearn.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULTS: dict[str, Any] = {"image_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


class ImageFileDataset(Dataset):
    """Image files decoded on access: ``(transform(image), label, index)``."""

    def __init__(self, paths: list[Path], labels: np.ndarray, transform: Callable, index: np.ndarray | None = None):
        self.paths = paths
        self.y = torch.as_tensor(labels, dtype=torch.long)
        self.index = torch.arange(len(paths)) if index is None else torch.as_tensor(index, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as image:
                image = image.convert("RGB")
        # not an image, truncated, or a decompression bomb: bad input, named (PIL's truncation message names none)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ConfigError(f"{str(self.paths[i])!r} is not a readable image: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())}") from None
        return self.transform(image), self.y[i], self.index[i]

    def with_transform(self, transform: Callable) -> ImageFileDataset:
        return ImageFileDataset(self.paths, self.y.numpy(), transform, self.index.numpy())

    @property
    def targets(self) -> np.ndarray:
        return self.y.numpy()


def scan_split(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[Path], np.ndarray]:
    """Classes (sorted sub-folders), files sorted by ``class/name``, and their labels."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise ConfigError(f"{str(folder)!r} has class folder {extra[0]!r} that the training split lacks; "
                              f"expected only: {', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}")
    lookup = {name: i for i, name in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for name in found:
        files = sorted(p for p in (folder / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [lookup[name]] * len(files)
    return classes, paths, np.asarray(labels, dtype=np.int64)


def _options(raw: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"data.options.{unknown[0]} is not an option of imagefolder; "
                          f"expected one of: {', '.join(sorted(DEFAULTS))}")
    opts = {**DEFAULTS, **raw}
    size = opts["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"data.options.image_size={size!r} is not valid; expected a positive integer")
    for key in ("mean", "std"):
        if len(opts[key]) != 3:
            raise ConfigError(f"data.options.{key}={opts[key]!r} is not valid; expected 3 numbers (R, G, B)")
        opts[key] = tuple(float(v) for v in opts[key])
    return opts


def transforms_for(opts: dict[str, Any]):
    """(train transform with augmentation, evaluation transform)."""
    from torchvision import transforms as T

    size = opts["image_size"]
    normalize = [T.ToTensor(), T.Normalize(opts["mean"], opts["std"])]
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize])
    evaluate = T.Compose([T.Resize(int(round(size * 8 / 7))), T.CenterCrop(size), *normalize])
    return train, evaluate


@DATASETS.register("imagefolder")
def build_imagefolder(cfg, seed: int) -> DatasetBundle:
    opts = _options(dict(cfg.options))
    if cfg.root is None:
        raise ConfigError("data set 'imagefolder' needs data.root (a folder with train/ and val/ class folders)")
    root = Path(cfg.root).expanduser()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(f"data.root={str(cfg.root)!r} has no {split}/ folder; expected "
                              "root/train/<class>/<image> and root/val/<class>/<image> (root/test optional)")
    classes, train_paths, clean_y = scan_split(root / "train")
    if not train_paths:
        raise ConfigError(f"{str(root / 'train')!r} holds no images in class sub-folders "
                          f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
    _, val_paths, val_y = scan_split(root / "val", classes)
    has_test = (root / "test").is_dir()
    test_paths, test_y = (scan_split(root / "test", classes)[1:] if has_test else (val_paths, val_y))

    train_y, flipped = flip_labels(clean_y, cfg.label_noise, len(classes), seed)
    train_tf, eval_tf = transforms_for(opts)
    train_eval = ImageFileDataset(train_paths, train_y, eval_tf)
    train = train_eval.with_transform(train_tf) if cfg.augment else train_eval
    size = opts["image_size"]
    return DatasetBundle(
        name="imagefolder", train=train, train_eval=train_eval,
        val=ImageFileDataset(val_paths, val_y, eval_tf), test=ImageFileDataset(test_paths, test_y, eval_tf),
        num_classes=len(classes), input_shape=(3, size, size), train_targets=train_y,
        meta={"flipped": flipped, "clean_targets": clean_y, "classes": classes,
              "test_is_val": not has_test, "root": str(root)},
    )
