"""A small Vision Transformer (ViT-S) from torchvision's encoder.

Patch embedding (a ``patch x patch`` convolution with stride ``patch``), a
learned class token, torchvision's ``vision_transformer.Encoder`` (learned
position embeddings, pre-norm blocks, final LayerNorm), and a linear head on
the class token. ViT-S: ``dim`` 384, ``depth`` 12, ``heads`` 6, MLP 4x.

The patch size follows the input unless given: 4 for CIFAR's 32x32 (64
tokens), 16 from 128 pixels up (ImageNet's 224: 196 tokens), 2 below 16
pixels (digits' 8x8: 16 tokens). Inputs must divide into whole patches.

Options: ``dim``, ``depth``, ``heads``, ``mlp_ratio``, ``patch_size``,
``dropout``, ``attention_dropout``. ``features`` is the final class token (``dim``).
"""
from __future__ import annotations

import torch
from torch import nn

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models.base import MODELS, FeatureModel
from sharp_unlearn.models.resnet import image_shape


def default_patch_size(height: int, width: int) -> int:
    side = min(height, width)
    if side >= 128:
        return 16
    if side >= 16:
        return 4
    return 2 if side >= 2 and height % 2 == 0 and width % 2 == 0 else 1


@MODELS.register("vit_s")
class ViTSmall(FeatureModel):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], dim: int = 384, depth: int = 12,
                 heads: int = 6, mlp_ratio: float = 4.0, patch_size: int | None = None, dropout: float = 0.0,
                 attention_dropout: float = 0.0):
        super().__init__()
        from torchvision.models.vision_transformer import Encoder

        self.image_shape = image_shape(input_shape)
        channels, height, width = self.image_shape
        patch = default_patch_size(height, width) if patch_size is None else int(patch_size)
        if patch < 1 or height % patch or width % patch:
            raise ConfigError(f"model.options.patch_size={patch} does not tile {height}x{width} inputs; "
                              "expected a positive divisor of both sides")
        if dim < 1 or heads < 1 or dim % heads:
            raise ConfigError(f"model.options.dim={dim} must be a positive multiple of heads={heads}")
        if depth < 1 or mlp_ratio <= 0:
            raise ConfigError(f"vit_s needs depth >= 1 and mlp_ratio > 0; got depth={depth}, mlp_ratio={mlp_ratio}")
        self.patch_size = patch
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        tokens = (height // patch) * (width // patch)
        self.encoder = Encoder(tokens + 1, depth, heads, dim, int(dim * mlp_ratio), dropout, attention_dropout)
        self.head = nn.Linear(dim, num_classes)
        self.feature_dim = dim
        # ViT's usual patch-embedding init: the conv as a linear map of the flattened patch
        fan_in = channels * patch * patch
        nn.init.trunc_normal_(self.patch_embed.weight, std=(1.0 / fan_in) ** 0.5)
        nn.init.zeros_(self.patch_embed.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x.reshape(x.shape[0], *self.image_shape))  # [B, dim, h, w]
        x = x.flatten(2).transpose(1, 2)  # [B, tokens, dim]
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.encoder(x)[:, 0]
