"""ResNet-18/50, VGG-16-BN, ViT-S: the feature/head contract, input adaptation, architecture sizes."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from sharp_unlearn.config import ModelConfig
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models import MODELS, build_model

SMALL = {
    "resnet18": {"width": 4},
    "resnet50": {"width": 4},
    "vgg16_bn": {"width": 4},
    "vit_s": {"dim": 32, "depth": 2, "heads": 4},
    "small_cnn": {"width": 4, "feature_dim": 16},
    "mlp": {"hidden": (16,)},
    "two_layer_cnn": {"width": 3},
}
SHAPES = [(3, 32, 32), (1, 8, 8), (2, 20)]  # CIFAR, digits, signal_noise patches


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(SMALL))
def test_feature_head_contract(name, shape):
    if name == "small_cnn" and len(shape) != 3:
        pytest.skip("small_cnn takes images only")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, options=SMALL[name]), num_classes=7, input_shape=shape).eval()
    x = torch.randn(3, *shape)
    out = model(x)
    assert out.shape == (3, 7)
    feats = model.features(x)
    assert feats.shape == (3, model.feature_dim)
    torch.testing.assert_close(model.head(feats), out)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16_bn", "vit_s"])
def test_a_few_steps_fit_a_fixed_batch(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, options=SMALL[name]), num_classes=4, input_shape=(1, 8, 8))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    first = F.cross_entropy(model(x), y).item()
    for _ in range(30):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_full_size_architectures_match_the_published_shapes():
    cifar = (3, 32, 32)
    # CIFAR ResNet-18 / ResNet-50 with 10 classes: the widely quoted parameter counts
    assert count(MODELS.get("resnet18")(num_classes=10, input_shape=cifar)) == 11_173_962
    assert count(MODELS.get("resnet50")(num_classes=10, input_shape=cifar)) == 23_520_842
    # CIFAR VGG-16-BN (14 728 266 with conv biases; ours drops the 4 224 biases BatchNorm makes redundant)
    vgg = MODELS.get("vgg16_bn")(num_classes=10, input_shape=cifar)
    assert count(vgg) == 14_728_266 - 4_224 and vgg.feature_dim == 512
    # ViT-S: 12 blocks of dim 384 / 6 heads; 64 patches of 4x4 plus the class token
    vit = MODELS.get("vit_s")(num_classes=10, input_shape=cifar)
    assert vit.patch_size == 4 and vit.encoder.pos_embedding.shape == (1, 65, 384)
    block = 4 * 384 * 384 + 4 * 384 + 2 * 384 * 1536 + 1536 + 384 + 4 * 384  # attention, MLP, 2 LayerNorms
    expected = 12 * block + (3 * 16 * 384 + 384) + 384 + 65 * 384 + 2 * 384 + (384 * 10 + 10)
    assert count(vit) == expected


def test_stem_and_patch_follow_the_input():
    assert MODELS.get("resnet18")(num_classes=2, input_shape=(1, 8, 8), width=4).stem == "cifar"
    imagenet = MODELS.get("resnet18")(num_classes=2, input_shape=(3, 64, 64), width=4)
    assert imagenet.stem == "imagenet" and imagenet(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    assert MODELS.get("vit_s")(num_classes=2, input_shape=(3, 224, 224), **SMALL["vit_s"]).patch_size == 16
    assert MODELS.get("vit_s")(num_classes=2, input_shape=(1, 8, 8), **SMALL["vit_s"]).patch_size == 2


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="width=0"):
        build_model(ModelConfig(name="resnet18", options={"width": 0}), 10, (3, 32, 32))
    with pytest.raises(ConfigError, match="stem='big'"):
        build_model(ModelConfig(name="resnet50", options={"stem": "big"}), 10, (3, 32, 32))
    with pytest.raises(ConfigError, match="patch_size=5"):
        build_model(ModelConfig(name="vit_s", options={"patch_size": 5}), 10, (3, 32, 32))
    with pytest.raises(ConfigError, match="depthh"):
        build_model(ModelConfig(name="vgg16_bn", options={"depthh": 3}), 10, (3, 32, 32))
