"""Parquet shards: any data set as ``root/{train,val,test}-*.parquet``, read and written with pyarrow.

One row per example: ``image`` (PNG bytes, or a fixed-size list of numbers),
``label`` (int64), ``index`` (int64, the example's stable index in the source).
The schema metadata key ``sharp_unlearn`` holds JSON describing the images:
``format`` (``png`` | ``array``), ``shape``, ``dtype`` (``uint8`` raw pixels or
``float32`` values), ``mean``/``std`` (normalisation applied on read, for raw
pixels), ``augmentation`` (``crop_flip`` or ``none``: the source's training
augmentation, applied on read when ``data.augment``), ``num_classes``,
``source``, and for the training split ``flipped_index`` (label flips already
baked into the labels at conversion).

What gets stored: a split that keeps raw uint8 pixels (CIFAR) is stored raw,
so the round trip is exact and augmentation still happens before
normalisation; any other split stores the float values its evaluation view
yields (``train_eval``: no augmentation). ``png`` needs values that are exactly
``k/255`` (or raw uint8); anything else is refused rather than silently rounded.

Reading: ``data.name=parquet data.root=DIR``; ``train`` is required, a missing
``val`` falls back to ``test`` and vice versa (``meta["val_is_test"]``).
Options: ``augmentation`` (override the recorded one).
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sharp_unlearn.data.base import DATASETS, DatasetBundle, build_dataset, flip_labels
from sharp_unlearn.data.cifar import ImageTensorDataset
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.files import atomic_path

SPLITS = ("train", "val", "test")
FORMATS = ("array", "png")
AUGMENTATIONS = ("none", "crop_flip")
META_KEY = b"sharp_unlearn"
OPTIONS = ("augmentation",)


# ------------------------------------------------------------------ writing
def _png_bytes(pixels: np.ndarray) -> bytes:
    """uint8 ``[C, H, W]`` (C = 1, 3 or 4) or ``[H, W]`` -> PNG bytes."""
    from PIL import Image

    if pixels.ndim == 3:
        if pixels.shape[0] not in (1, 3, 4):
            raise ConfigError(f"image_format=png needs 1, 3 or 4 channels; got shape {list(pixels.shape)}; "
                              "use image_format=array")
        pixels = pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1)
    elif pixels.ndim != 2:
        raise ConfigError(f"image_format=png needs images of shape [C, H, W] or [H, W]; got {list(pixels.shape)}; "
                          "use image_format=array")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_png(data: bytes, shape: list[int]) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        pixels = np.array(image)  # a writable copy (torch refuses read-only buffers)
    if len(shape) == 3:
        pixels = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
    return pixels.reshape(shape)


def _split_source(dataset: Dataset):
    """(raw uint8 images and their normalisation) when the split keeps raw pixels, else None."""
    if isinstance(dataset, ImageTensorDataset) and dataset.images.dtype == torch.uint8:
        mean = None if dataset.mean is None else dataset.mean.flatten().tolist()
        std = None if dataset.std is None else dataset.std.flatten().tolist()
        return dataset, mean, std
    return None


def _batches(dataset: Dataset, batch_size: int):
    """(values as numpy, labels, indices) per batch, in dataset order."""
    raw = _split_source(dataset)
    if raw is not None:
        data = raw[0]
        for start in range(0, len(data), batch_size):
            stop = min(start + batch_size, len(data))
            yield (data.images[start:stop].numpy(), data.y[start:stop].numpy(), data.index[start:stop].numpy())
        return
    for x, y, index in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield x.float().numpy(), y.numpy(), index.numpy()


def _write_table(path: Path, rows: dict[str, list], meta: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if meta["format"] == "png":
        image = pa.array(rows["image"], type=pa.binary())
    else:
        flat = np.concatenate([v.reshape(-1) for v in rows["image"]]) if rows["image"] else np.zeros(0)
        values = pa.array(flat.astype(np.dtype(meta["dtype"]), copy=False))
        image = pa.FixedSizeListArray.from_arrays(values, int(np.prod(meta["shape"])))
    table = pa.table({"image": image, "label": pa.array(rows["label"], pa.int64()),
                      "index": pa.array(rows["index"], pa.int64())})
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    with atomic_path(path) as tmp:  # a reader never sees a half-written shard
        pq.write_table(table, tmp)


def _is_shard(path: Path) -> bool:
    """A shard this module writes, or the temp file of one being written (``.<shard>.<pid>.tmp``,
    or ``<shard>.tmp`` from versions before files.atomic_path)."""
    name = path.name
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:].rsplit(".", 2)[0]
    return any(name.startswith(f"{split}-") for split in SPLITS) and name.endswith((".parquet", ".parquet.tmp"))


def _source_root(source) -> Path | None:
    """The folder the source data set is read from, when it has one."""
    if isinstance(source, DatasetBundle):
        root = source.meta.get("root") or source.meta.get("folder")
    else:
        root = getattr(source, "root", None)
    return None if root is None else Path(root).expanduser()


def _check_out(out: Path, source, overwrite: bool) -> None:
    """Refuse, before anything is read or written, an output that would destroy data."""
    root = _source_root(source)
    if root is not None:
        a, b = out.resolve(), root.resolve()
        if a == b or b in a.parents or a in b.parents:
            relation = "is" if a == b else ("is inside" if b in a.parents else "contains")
            raise ConfigError(f"--out {str(out)!r} {relation} the source data.root={str(root)!r}; converting in "
                              "place would destroy the source: choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; expected a folder for the shards")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    shards = [p for p in entries if _is_shard(p)]
    if shards and not overwrite:
        raise ConfigError(f"{str(out)!r} already holds shards (e.g. {shards[0].name}); "
                          "pass overwrite=True (--overwrite) or choose another folder")
    others = [p for p in entries if not _is_shard(p)]
    if shards and others:
        # overwriting swaps the whole folder for the new one: anything else in it would go too
        raise ConfigError(f"{str(out)!r} holds {others[0].name!r} besides the shards; overwrite replaces the "
                          "whole folder, so move it away or choose another folder")


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Put the fully written ``tmp`` where ``out`` is; the old shards go only once the new ones are in place."""
    if not out.exists():
        os.rename(tmp, out)
        return
    entries = list(out.iterdir())
    if not entries:
        out.rmdir()
        os.rename(tmp, out)
        return
    if not any(_is_shard(p) for p in entries):  # a folder of other files: the shards join them
        for path in sorted(tmp.iterdir()):
            os.replace(path, out / path.name)
        tmp.rmdir()
        return
    _check_out(out, None, overwrite)  # still only shards (nothing was added while converting)
    old = tmp.with_name(tmp.name.replace(".converting-", ".replaced-"))
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def convert_to_parquet(source, out_dir: str | os.PathLike, shard_size: int = 10_000, *,
                       image_format: str = "array", seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Write ``source`` (a DatasetBundle or a DataConfig) as Parquet shards in ``out_dir``.

    Everything is written to a new sibling folder first and swapped in only once complete, so a
    failure (bad input included) leaves ``out_dir`` as it was; an output that is, contains or lies
    inside the source's folder is refused. Returns a summary: ``out_dir``, ``format``, rows and
    shards per split.
    """
    if image_format not in FORMATS:
        raise ConfigError(f"image_format={image_format!r} is not valid; expected one of: {', '.join(FORMATS)}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard_size={shard_size!r} is not valid; expected a positive integer")
    # resolved: a symlinked output swaps the folder it points to, and "." or ".." have a real name and parent
    out = Path(out_dir).expanduser().resolve()
    _check_out(out, source, overwrite)
    bundle: DatasetBundle = source if isinstance(source, DatasetBundle) else build_dataset(source, seed)

    summary: dict[str, Any] = {"out_dir": str(out), "format": image_format, "source": bundle.name,
                               "rows": {}, "shards": {}}
    created = [d for d in (out.parent, *out.parent.parents) if not d.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.converting-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for split, dataset in (("train", bundle.train_eval), ("val", bundle.val), ("test", bundle.test)):
            shards = _write_split(bundle, split, dataset, tmp, shard_size, image_format)
            summary["rows"][split] = len(dataset)
            summary["shards"][split] = len(shards)
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the old output, if any, is untouched
        for folder in created:  # parents made for this output only
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return summary


def _image_value(value: np.ndarray, image_format: str, raw: bool, where: str):
    if image_format == "array":
        return value
    if not raw:
        pixels = np.round(value * 255.0)
        worst = float(np.abs(pixels / 255.0 - value).max()) if value.size else 0.0
        if worst > 1e-6 or pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
            raise ConfigError(f"image_format=png would change {where} values (they are not k/255 in [0, 1]; "
                              f"error up to {worst:.3g}); use image_format=array (exact)")
        value = pixels.astype(np.uint8)
    return _png_bytes(value)


def _write_split(bundle: DatasetBundle, split: str, dataset: Dataset, out: Path, shard_size: int,
                 image_format: str) -> list[Path]:
    raw = _split_source(dataset)
    meta: dict[str, Any] = {
        "version": 1, "format": image_format, "source": bundle.name, "split": split,
        "num_classes": int(bundle.num_classes),
        "dtype": "uint8" if raw is not None else "float32",
        "mean": raw[1] if raw is not None else None, "std": raw[2] if raw is not None else None,
        "augmentation": bundle.meta.get("augmentation", "none"),
    }
    if image_format == "png" and raw is None:
        meta["dtype"] = "uint8_scaled"  # values k/255 stored as PNG pixels k: divide by 255 on read
    if split == "train":
        flipped = np.asarray(bundle.meta.get("flipped", []), dtype=np.int64)
        stable = np.asarray(getattr(dataset, "index", np.arange(len(dataset))))
        meta["flipped_index"] = stable[flipped].tolist() if len(flipped) else []
    total = math.ceil(len(dataset) / shard_size)
    paths: list[Path] = []
    rows: dict[str, list] = {"image": [], "label": [], "index": []}
    for values, labels, indices in _batches(dataset, min(shard_size, 1024)):
        meta.setdefault("shape", list(values.shape[1:]))
        for value, label, index in zip(values, labels, indices, strict=True):
            rows["image"].append(_image_value(value, image_format, raw is not None, f"{bundle.name}'s {split}"))
            rows["label"].append(int(label))
            rows["index"].append(int(index))
            if len(rows["label"]) == shard_size:
                paths.append(out / f"{split}-{len(paths):05d}-of-{total:05d}.parquet")
                _write_table(paths[-1], rows, meta)
                rows = {"image": [], "label": [], "index": []}
    if rows["label"]:
        paths.append(out / f"{split}-{len(paths):05d}-of-{total:05d}.parquet")
        _write_table(paths[-1], rows, meta)
    return paths


# ------------------------------------------------------------------ reading
class PngImageDataset(ImageTensorDataset):
    """PNG bytes decoded on access; otherwise like ImageTensorDataset."""

    def __init__(self, blobs, shape: list[int], labels, index, where: str = "parquet", **kwargs):
        super().__init__(torch.zeros(len(labels), 0), labels, index, **kwargs)
        self.blobs = blobs
        self.shape = list(shape)
        self.where = where

    def pixels(self, i: int) -> torch.Tensor:
        from PIL import Image

        try:
            return torch.from_numpy(_decode_png(self.blobs[i].as_py(), self.shape))
        # decoded on access (during training): still bad input, so name where it is
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ConfigError(f"{self.where} row {i} (index {int(self.index[i])}): column 'image' is not a PNG "
                              f"of shape {self.shape}: {type(exc).__name__}: {' '.join(str(exc).split())}") from None


def _read_split(paths: list[Path]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables, meta = [], None
    for path in paths:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ConfigError(f"{str(path)!r} is not a readable Parquet shard: {exc}") from None
        missing = {"image", "label", "index"} - set(table.column_names)
        if missing:
            raise ConfigError(f"{str(path)!r} lacks column(s) {', '.join(sorted(missing))}; "
                              "expected image, label, index")
        _check_shard(path, table)
        raw = (table.schema.metadata or {}).get(META_KEY)
        shard_meta = json.loads(raw) if raw else None
        if meta is None:
            meta = shard_meta
        elif shard_meta and (shard_meta.get("format"), shard_meta.get("shape")) != (meta.get("format"),
                                                                                  meta.get("shape")):
            raise ConfigError(f"{str(path)!r} stores {shard_meta.get('format')} images of shape "
                              f"{shard_meta.get('shape')}; other shards hold {meta.get('format')} {meta.get('shape')}")
        tables.append(table.replace_schema_metadata(None))
    table = pa.concat_tables(tables)
    return table, meta or {}, [(path, t.num_rows) for path, t in zip(paths, tables, strict=True)]


def _check_shard(path: Path, table) -> None:
    """Refuse, before any training, what would otherwise fail (or silently mislead) only later."""
    import pyarrow as pa

    if table.num_rows == 0:
        raise ConfigError(f"{str(path)!r} holds zero rows; expected at least one example per shard")
    for name in ("label", "index", "image"):
        column = table.column(name)
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise ConfigError(f"{str(path)!r}: column {name!r} is empty (null) in row {row}; "
                              "expected a value in every row")
        if name != "image" and not pa.types.is_integer(column.type):
            raise ConfigError(f"{str(path)!r}: column {name!r} holds {column.type} values "
                              f"(e.g. {column[0].as_py()!r}); expected integers")
    image = table.column("image").combine_chunks()
    if pa.types.is_fixed_size_list(image.type):
        value_type = image.type.value_type
        if not (pa.types.is_integer(value_type) or pa.types.is_floating(value_type)):
            raise ConfigError(f"{str(path)!r}: column 'image' holds lists of {value_type}; expected numbers")
        if pa.types.is_floating(value_type):
            values = image.flatten().to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                row = int(bad[0]) // image.type.list_size
                raise ConfigError(f"{str(path)!r}: column 'image' holds {values[bad[0]]} in row {row}; "
                                  "expected finite pixel values")


def _check_labels(split: str, labels: np.ndarray, index: np.ndarray, sources: list, num_classes: int) -> None:
    """Labels in ``0..num_classes-1`` and each stable index once, naming the shard of the first offender."""
    def shard_of(row: int) -> str:
        for path, rows in sources:
            if row < rows:
                return f"{str(path)!r} row {row}"
            row -= rows
        return f"{split} row {row}"

    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ConfigError(f"{shard_of(int(bad[0]))}: column 'label' holds {int(labels[bad[0]])}; "
                          f"expected 0..{num_classes - 1} (num_classes={num_classes})")
    order = np.argsort(index, kind="stable")
    repeated = np.flatnonzero(index[order][1:] == index[order][:-1])
    if repeated.size:
        row = int(order[repeated[0] + 1])
        raise ConfigError(f"{shard_of(row)}: column 'index' repeats {int(index[row])}; "
                          f"expected each example's stable index once per split")


def _dataset_from_table(table, meta: dict[str, Any], where: str, labels: np.ndarray | None = None):
    image = table.column("image").combine_chunks()
    y = torch.from_numpy(table.column("label").to_numpy().astype(np.int64) if labels is None else labels)
    index = torch.from_numpy(table.column("index").to_numpy().astype(np.int64))
    import pyarrow as pa

    dtype = meta.get("dtype", "float32")
    scale = 255.0 if dtype in ("uint8", "uint8_scaled") else 1.0
    norm = {"mean": meta.get("mean"), "std": meta.get("std")}
    if pa.types.is_binary(image.type) or pa.types.is_large_binary(image.type):
        shape = meta.get("shape")
        if not shape:
            raise ConfigError(f"{where}: PNG images need their 'shape' in the schema metadata "
                              f"key {META_KEY.decode()!r}")
        return PngImageDataset(image, shape, y, index, where=where, scale=scale, **norm)
    if not pa.types.is_fixed_size_list(image.type):
        raise ConfigError(f"{where}: column 'image' is {image.type}; expected binary (PNG) or a fixed-size list")
    shape = meta.get("shape") or [image.type.list_size]
    if int(np.prod(shape)) != image.type.list_size:
        raise ConfigError(f"{where}: metadata shape {shape} does not match {image.type.list_size} values per image")
    values = image.flatten().to_numpy(zero_copy_only=False).reshape(len(image), *shape)
    images = torch.from_numpy(np.array(values))  # a writable copy: Arrow's buffers are read-only
    return ImageTensorDataset(images, y, index, scale=scale, **norm)


@DATASETS.register("parquet")
def build_parquet(cfg, seed: int) -> DatasetBundle:
    unknown = sorted(set(cfg.options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"data.options.{unknown[0]} is not an option of parquet; expected one of: "
                          f"{', '.join(OPTIONS)}")
    if cfg.root is None:
        raise ConfigError("data set 'parquet' needs data.root (a folder of {train,val,test}-*.parquet shards)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root={str(cfg.root)!r} is not a folder; expected one holding "
                          "train-*.parquet (and val-*/test-*.parquet) shards")
    shards = {split: sorted(root.glob(f"{split}-*.parquet")) for split in SPLITS}
    if not shards["train"]:
        raise ConfigError(f"data.root={str(cfg.root)!r} has no train-*.parquet shards; "
                          "expected root/{train,val,test}-*.parquet (sharp-unlearn convert writes them)")
    if not shards["val"] and not shards["test"]:
        raise ConfigError(f"data.root={str(cfg.root)!r} has no val-*.parquet or test-*.parquet shards; "
                          "expected at least one of them besides train")
    tables = {split: _read_split(paths) for split, paths in shards.items() if paths}
    train_table, train_meta, _ = tables["train"]
    augmentation = cfg.options.get("augmentation", train_meta.get("augmentation", "none"))
    if augmentation not in AUGMENTATIONS:
        raise ConfigError(f"data.options.augmentation={augmentation!r} is not valid; "
                          f"expected one of: {', '.join(AUGMENTATIONS)}")

    clean_y = train_table.column("label").to_numpy().astype(np.int64)
    labels = {split: t.column("label").to_numpy().astype(np.int64) for split, (t, _, _) in tables.items()}
    num_classes = train_meta.get("num_classes") or max(int(v.max(initial=-1)) for v in labels.values()) + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"{shards['train'][0]}: metadata num_classes={num_classes!r} is not valid; "
                          "expected a positive integer")
    for split, (table, _, sources) in tables.items():
        _check_labels(split, labels[split], table.column("index").to_numpy().astype(np.int64), sources, num_classes)
    train_y, flipped = flip_labels(clean_y, cfg.label_noise, num_classes, seed)
    train_eval = _dataset_from_table(train_table, train_meta, f"{root}/train", labels=train_y)
    train = train_eval.with_augment(bool(cfg.augment) and augmentation == "crop_flip")
    val = _dataset_from_table(*tables["val" if "val" in tables else "test"][:2], f"{root}/val")
    test = _dataset_from_table(*tables["test" if "test" in tables else "val"][:2], f"{root}/test")
    stable = train_eval.index.numpy()
    shape = train_meta.get("shape") or (list(train_eval[0][0].shape) if len(train_eval) else [])
    return DatasetBundle(
        name="parquet", train=train, train_eval=train_eval, val=val, test=test, num_classes=num_classes,
        input_shape=tuple(int(s) for s in shape), train_targets=train_y,
        meta={"flipped": flipped, "flipped_index": stable[flipped], "train_index": stable,
              "clean_targets": clean_y, "source": train_meta.get("source"),
              "source_flipped_index": np.asarray(train_meta.get("flipped_index", []), dtype=np.int64),
              "val_is_test": "val" not in tables or "test" not in tables, "root": str(root)},
    )
