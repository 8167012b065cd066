"""VGG-16 with BatchNorm, CIFAR-style: 13 conv layers, global pooling, one linear head.

The ImageNet VGG ends in two 4096-wide fully connected layers sized for 7x7
maps; the CIFAR variant pools to one vector per image and classifies it
directly, which is what unlearning papers on CIFAR train. A max-pool is
skipped once the map is a single pixel, so small inputs (digits' 8x8) still
pass through all 13 conv layers.

Options: ``width`` (channels of the first block, 64; tests use 8).
``features`` is the pooled output of the last block (``8 * width``).
"""
from __future__ import annotations

import torch
from torch import nn

from sharp_unlearn.models.base import MODELS, FeatureModel
from sharp_unlearn.models.resnet import check_width, image_shape

#: channel multipliers of the first block's width; "M" is a 2x2 max-pool
VGG16_LAYOUT = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")


@MODELS.register("vgg16_bn")
class VGG16BN(FeatureModel):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: int = 64):
        super().__init__()
        width = check_width("vgg16_bn", width)
        self.image_shape = image_shape(input_shape)
        cin, height, wide = self.image_shape
        layers: list[nn.Module] = []
        for item in VGG16_LAYOUT:
            if item == "M":
                if min(height, wide) >= 2:
                    layers.append(nn.MaxPool2d(2))
                    height, wide = height // 2, wide // 2
                continue
            cout = width * int(item)
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)
        self.feature_dim = cin
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(x.shape[0], *self.image_shape))
