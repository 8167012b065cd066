"""Unlearning methods: one file each, registered by name."""
from sharp_unlearn.methods.base import METHODS, UnlearnContext, UnlearningMethod

from sharp_unlearn.methods import neggrad  # noqa: F401,E402

__all__ = ["METHODS", "UnlearnContext", "UnlearningMethod"]
