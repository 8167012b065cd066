"""Alias of :mod:`sharp_unlearn.tuning`, the sweep API (``from sharp_unlearn.tune import run_sweep``
keeps working); new code imports ``sharp_unlearn.tuning``."""
from sharp_unlearn.tuning import *  # noqa: F403
from sharp_unlearn.tuning import __all__  # noqa: F401
