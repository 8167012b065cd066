"""scikit-learn's bundled 8x8 digits: the embedded default (offline, seconds to train).

Fixed split (seeded by a constant, not the run seed, so every run sees the same
train/val/test examples): 1257 train / 180 val / 360 test. Pixels are scaled
to [0, 1] and shaped ``[1, 8, 8]``.
"""
from __future__ import annotations

import numpy as np
import torch

from sharp_unlearn.data.base import DATASETS, DatasetBundle, IndexedTensorDataset, flip_labels

SPLIT_SEED = 20260101
VAL_SIZE = 180
TEST_SIZE = 360


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return x, digits.target.astype(np.int64)


@DATASETS.register("digits")
def build_digits(cfg, seed: int) -> DatasetBundle:
    x, y = load_digits_arrays()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    test_idx, val_idx, train_idx = (order[:TEST_SIZE], order[TEST_SIZE:TEST_SIZE + VAL_SIZE],
                                    order[TEST_SIZE + VAL_SIZE:])
    train_y, flipped = flip_labels(y[train_idx], cfg.label_noise, 10, seed)
    train = IndexedTensorDataset(torch.from_numpy(x[train_idx]), torch.from_numpy(train_y))
    val = IndexedTensorDataset(torch.from_numpy(x[val_idx]), torch.from_numpy(y[val_idx]))
    test = IndexedTensorDataset(torch.from_numpy(x[test_idx]), torch.from_numpy(y[test_idx]))
    return DatasetBundle(
        name="digits", train=train, train_eval=train, val=val, test=test, num_classes=10,
        input_shape=(1, 8, 8), train_targets=train_y,
        meta={"flipped": flipped, "clean_targets": y[train_idx]},
    )
