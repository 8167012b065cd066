"""ResNet-18 / ResNet-50, CIFAR-style by default (3x3 stem, stride 1, no max-pool).

The CIFAR stem keeps 32x32 inputs at full resolution into the first stage (the
ImageNet stem would shrink them to 8x8 before any residual block). ``stem``
picks it explicitly; ``auto`` uses the CIFAR stem below 64 pixels and the
ImageNet one (7x7 stride 2 + max-pool) from 64 pixels up, so the same names
serve CIFAR, digits (1x8x8) and ImageNet folders.

Options: ``width`` (channels of the first stage, 64; tests use 8), ``stem``.
``features`` is the globally pooled output of the last stage
(``8 * width`` channels for ResNet-18, ``32 * width`` for ResNet-50).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models.base import MODELS, FeatureModel

STEMS = ("auto", "cifar", "imagenet")


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``[C, H, W]`` for a convolutional model: images as given, ``[P, d]`` as one
    channel of ``P x d``, a flat vector as one row."""
    if len(input_shape) == 3:
        return tuple(int(s) for s in input_shape)  # type: ignore[return-value]
    if len(input_shape) == 2:
        return (1, int(input_shape[0]), int(input_shape[1]))
    return (1, 1, int(math.prod(input_shape)))


def check_width(name: str, width: int) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"model.options.width={width!r} is not valid for {name}; expected a positive integer")
    return width


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 (ResNet v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(FeatureModel):
    def __init__(self, block: type[nn.Module], depths: tuple[int, ...], num_classes: int,
                 input_shape: tuple[int, ...], width: int = 64, stem: str = "auto", name: str = "resnet"):
        super().__init__()
        width = check_width(name, width)
        if stem not in STEMS:
            raise ConfigError(f"model.options.stem={stem!r} is not valid; expected one of: {', '.join(STEMS)}")
        self.image_shape = image_shape(input_shape)
        channels, height, wide = self.image_shape
        if stem == "auto":
            stem = "cifar" if min(height, wide) < 64 else "imagenet"
        if stem == "cifar":
            layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, 1, 1, bias=False)]
        else:
            layers = [nn.Conv2d(channels, width, 7, 2, 3, bias=False)]
        layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        if stem == "imagenet":
            layers.append(nn.MaxPool2d(3, 2, 1))
        cin = width
        for stage, depth in enumerate(depths):
            planes = width * 2 ** stage
            for k in range(depth):
                layers.append(block(cin, planes, 2 if (stage > 0 and k == 0) else 1))
                cin = planes * block.expansion
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)
        self.feature_dim = cin
        self.stem = stem
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(x.shape[0], *self.image_shape))


@MODELS.register("resnet18")
def resnet18(num_classes: int, input_shape: tuple[int, ...], width: int = 64, stem: str = "auto") -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, input_shape, width, stem, "resnet18")


@MODELS.register("resnet50")
def resnet50(num_classes: int, input_shape: tuple[int, ...], width: int = 64, stem: str = "auto") -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, input_shape, width, stem, "resnet50")
