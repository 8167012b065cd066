"""The model contract: every registered model splits into features + head.

``forward(x) == head(features(x))``; ``features`` returns the penultimate
representation (a ``[batch, feature_dim]`` tensor) that entanglement metrics
and UMAP plots use.
"""
from __future__ import annotations

import torch
from torch import nn

from sharp_unlearn.errors import ConfigError, shape_mismatch
from sharp_unlearn.registry import Registry

#: name -> builder(num_classes: int, input_shape: tuple, **params) -> FeatureModel
MODELS: Registry = Registry("model")


class FeatureModel(nn.Module):
    """Base class: subclasses define ``self.body`` (to features) and ``self.head``."""

    feature_dim: int

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load weights, turning an architecture mismatch into a one-line ConfigError naming ``source``."""
    detail = shape_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()},
                            {k: tuple(v.shape) for k, v in state.items()})
    if detail:
        raise ConfigError(f"{source} does not match the model architecture ({detail})")
    model.load_state_dict(state)
