"""A multi-layer perceptron on flattened inputs."""
from __future__ import annotations

import math

from torch import nn

from sharp_unlearn.models.base import MODELS, FeatureModel


@MODELS.register("mlp")
class MLP(FeatureModel):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], hidden: tuple[int, ...] = (256, 128),
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        self.feature_dim = width
