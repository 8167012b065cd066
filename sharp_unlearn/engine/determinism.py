"""Process-wide settings that decide whether a run is bit-identical: kernels and CPU threads.

The seed alone is not enough: a float sum split over N threads is added in a
different order than over M threads, so the same seed on 1 and on 2 threads
gives (slightly) different weights, and differences grow over epochs. With
``deterministic=true`` the thread count is fixed (``threads``, else 1) and torch
is asked for deterministic kernels, so the same seed, thread count, device and
library versions give the same bits. Different machines, CPU instruction sets
or GPU models can still differ.
"""
from __future__ import annotations

import os

import torch

from sharp_unlearn.config import ExperimentConfig


def apply_determinism(cfg: ExperimentConfig) -> None:
    """Apply ``cfg.threads`` and ``cfg.deterministic`` to this process (idempotent).

    Called by every training stage (local and DeepSpeed) before its first step
    and by recipes that measure a model before training it.
    """
    threads = cfg.threads or (1 if cfg.deterministic else None)
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if not cfg.deterministic:
        return
    # cuBLAS is only deterministic with a fixed workspace; the variable is read when its handle is
    # created, so it must be set before the first matmul on the GPU (a user's own value wins)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False  # autotuning may pick a different kernel each run
    torch.backends.cudnn.deterministic = True
    # warn_only: an op without a deterministic kernel warns instead of failing a long run midway
    torch.use_deterministic_algorithms(True, warn_only=True)
