"""Evaluation metrics: accuracy, ToW, MIA, entanglement, loss landscape, sharpness, UMAP.

``METRICS`` maps a name to a :class:`~sharp_unlearn.metrics.base.MetricSpec`;
the modules below register their members (heavy parts, such as POT, UMAP and
matplotlib, are imported only when a metric runs).
"""
from sharp_unlearn.metrics import (
                                        accuracy,  # noqa: F401,E402  (registers "accuracy"; split_accuracies)
                                        entanglement,  # noqa: F401,E402  (registers "entanglement")
                                        landscape,  # noqa: F401,E402  (registers "landscape")
                                        mia,  # noqa: F401,E402  (registers "mia")
                                        sharpness,  # noqa: F401,E402  (registers "sharpness")
                                        tow,  # noqa: F401,E402  (registers "tow"; tow, forget_gap)
                                        umap_plot,  # noqa: F401,E402  (registers "umap")
)
from sharp_unlearn.metrics.base import (  # noqa: F401
                                        METRICS,
                                        EvalContext,
                                        EvalOptions,
                                        MetricResult,
                                        MetricSpec,
                                        MetricValue,
                                        SplitOutputs,
                                        register_metric,
)

__all__ = ["METRICS", "EvalContext", "EvalOptions", "MetricResult", "MetricSpec", "MetricValue", "SplitOutputs",
           "register_metric"]
