"""Evaluation metrics: accuracy, ToW, MIA, entanglement, loss landscape, sharpness, UMAP.

``METRICS`` maps a name to a :class:`~sharp_unlearn.metrics.base.MetricSpec`;
the modules below register their members (heavy parts, such as POT, UMAP and
matplotlib, are imported only when a metric runs).
"""
from sharp_unlearn.metrics.base import (METRICS, EvalContext, EvalOptions, MetricResult, MetricSpec,  # noqa: F401
                                        MetricValue, SplitOutputs, register_metric)
from sharp_unlearn.metrics import accuracy  # noqa: F401,E402  (lead: split_accuracies)
from sharp_unlearn.metrics import tow  # noqa: F401,E402  (lead: tow, forget_gap, mean_ci95)
from sharp_unlearn.metrics import tow_accuracy  # noqa: F401,E402  (registers "accuracy", "tow")
from sharp_unlearn.metrics import mia  # noqa: F401,E402  (registers "mia")
from sharp_unlearn.metrics import entanglement  # noqa: F401,E402  (registers "entanglement")
from sharp_unlearn.metrics import sharpness  # noqa: F401,E402  (registers "sharpness")
from sharp_unlearn.metrics import landscape  # noqa: F401,E402  (registers "landscape")
from sharp_unlearn.metrics import umap_plot  # noqa: F401,E402  (registers "umap")

__all__ = ["METRICS", "EvalContext", "EvalOptions", "MetricResult", "MetricSpec", "MetricValue", "SplitOutputs",
           "register_metric"]
