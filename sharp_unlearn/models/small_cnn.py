"""A small convolutional network for 8x8 to 32x32 inputs, with BatchNorm.

BatchNorm is on purpose: it exercises the SAM second-pass statistics freeze.
"""
from __future__ import annotations

from torch import nn

from sharp_unlearn.models.base import MODELS, FeatureModel


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


@MODELS.register("small_cnn")
class SmallCNN(FeatureModel):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: int = 32, feature_dim: int = 128):
        super().__init__()
        channels = input_shape[0]
        self.body = nn.Sequential(
            _block(channels, width), _block(width, width), nn.MaxPool2d(2),
            _block(width, 2 * width), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(2 * width * 4, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
