"""Data sets (registry), forget-set selection, memorization scores, Parquet IO."""
from sharp_unlearn.data import (  # noqa: F401,E402
    cifar,
    digits,  # noqa: F401  (registers "digits")
    imagefolder,
    parquet,
    signal_noise,  # noqa: F401,E402  (registers "signal_noise")
)
from sharp_unlearn.data.base import DATASETS, DatasetBundle, IndexedTensorDataset, build_dataset

__all__ = ["DATASETS", "DatasetBundle", "IndexedTensorDataset", "build_dataset"]
