"""Optimizers: SAM / ASAM (min and max), parameter masks, builders."""
from sharp_unlearn.optim.sam import SAM, SamSpec, combine, frozen_bn_stats, perturbation

__all__ = ["SAM", "SamSpec", "combine", "frozen_bn_stats", "perturbation"]
