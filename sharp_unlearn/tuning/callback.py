"""The Ray Tune callback that writes a sweep's child runs (imports Ray: load it only when running a sweep)."""
from __future__ import annotations

from ray import tune

from sharp_unlearn.tuning.runs import TrialRunsMixin


class TrialRuns(TrialRunsMixin, tune.Callback):
    """One MLflow child run per trial (see ``tuning/runs.py``)."""
