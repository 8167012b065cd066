"""Unlearning methods: one file each, registered by name."""
from sharp_unlearn.methods import (
    finetune,  # noqa: F401,E402
    grad_ascent,  # noqa: F401,E402
    l1_sparse,  # noqa: F401,E402
    neggrad,  # noqa: F401,E402
    npo,  # noqa: F401,E402
    random_label,  # noqa: F401,E402
    retrain,  # noqa: F401,E402
    rum,  # noqa: F401,E402
    salun,  # noqa: F401,E402
    scrub,  # noqa: F401,E402
    sharp_minmax,  # noqa: F401,E402
)
from sharp_unlearn.methods.base import METHODS, UnlearnContext, UnlearningMethod

__all__ = ["METHODS", "UnlearnContext", "UnlearningMethod"]
