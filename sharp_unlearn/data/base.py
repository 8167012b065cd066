"""The data contract every registered data set follows.

A data set builder returns a :class:`DatasetBundle`. Every split is a torch
``Dataset`` whose items are ``(x, y, index)``: ``index`` is the example's stable
position in its split, so forget sets, memorization scores and Parquet shards
can name examples across runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sharp_unlearn.registry import Registry

#: name -> builder(cfg: DataConfig, seed: int) -> DatasetBundle
DATASETS: Registry = Registry("data set")


class IndexedTensorDataset(Dataset):
    """In-memory examples: ``x[i], y[i], i`` (small data sets, shards, tests)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x = x
        self.y = y.long()
        self.index = torch.arange(len(x)) if index is None else index.long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], self.index[i]

    @property
    def targets(self) -> np.ndarray:
        return self.y.numpy()


@dataclass
class DatasetBundle:
    """Everything the rest of the system needs to know about a data set.

    ``train`` may apply augmentation; ``train_eval`` holds the same examples
    (same indices) without it, for measuring retain/forget accuracy.
    """

    name: str
    train: Dataset
    train_eval: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    #: labels of the training split, aligned with index (after any label noise)
    train_targets: np.ndarray
    #: free-form facts: e.g. ``flipped`` (training *positions* whose labels were flipped on
    #: purpose; ``flipped_index`` holds their stable indices where those differ),
    #: ``train_index`` (stable index of each training position, when not 0..n-1),
    #: ``signal`` (the theory model's mu), ``noise`` (per-example noise patches)
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"{self.name}: train={len(self.train)} val={len(self.val)} test={len(self.test)} "
            f"classes={self.num_classes} input={self.input_shape}"
        )


def flip_labels(targets: np.ndarray, fraction: float, num_classes: int, seed: int):
    """Flip ``fraction`` of labels to a different random class (seeded).

    Returns the new targets and the sorted flipped indices, so the flip is a
    recorded fact that memorization scores can be checked against.
    """
    targets = np.asarray(targets).copy()
    if fraction <= 0:
        return targets, np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed + 7919)
    count = int(round(fraction * len(targets)))
    flipped = np.sort(rng.choice(len(targets), size=count, replace=False))
    shift = rng.integers(1, num_classes, size=count)
    targets[flipped] = (targets[flipped] + shift) % num_classes
    return targets, flipped.astype(np.int64)


def build_dataset(cfg, seed: int = 0) -> DatasetBundle:
    """Build the configured data set (``cfg`` is a DataConfig)."""
    return DATASETS.get(cfg.name)(cfg, seed)
