"""Optimizers: SAM / ASAM (min and max), parameter masks, builders."""
from sharp_unlearn.optim.sam import SAM, combine, frozen_bn_stats, perturbation

__all__ = ["SAM", "combine", "frozen_bn_stats", "perturbation"]
