"""Unlearning methods: one file each, registered by name."""
from sharp_unlearn.methods.base import METHODS, UnlearnContext, UnlearningMethod

from sharp_unlearn.methods import neggrad  # noqa: F401,E402
from sharp_unlearn.methods import retrain  # noqa: F401,E402
from sharp_unlearn.methods import finetune  # noqa: F401,E402
from sharp_unlearn.methods import l1_sparse  # noqa: F401,E402
from sharp_unlearn.methods import grad_ascent  # noqa: F401,E402
from sharp_unlearn.methods import random_label  # noqa: F401,E402
from sharp_unlearn.methods import scrub  # noqa: F401,E402
from sharp_unlearn.methods import salun  # noqa: F401,E402
from sharp_unlearn.methods import sharp_minmax  # noqa: F401,E402
from sharp_unlearn.methods import rum  # noqa: F401,E402

__all__ = ["METHODS", "UnlearnContext", "UnlearningMethod"]
