"""Model registry: every model exposes ``features(x)`` (penultimate) and ``head``."""
from sharp_unlearn.models import (  # noqa: F401  (register members)  # noqa: F401,E402
    mlp,
    resnet,
    small_cnn,
    two_layer_cnn,  # noqa: F401,E402
    vgg,
    vit,
)
from sharp_unlearn.models.base import MODELS, FeatureModel

__all__ = ["MODELS", "FeatureModel", "build_model"]


def build_model(cfg, num_classes: int, input_shape: tuple[int, ...]) -> FeatureModel:
    """Build the configured model (``cfg`` is a ModelConfig)."""
    from sharp_unlearn.errors import ConfigError

    builder = MODELS.get(cfg.name)
    try:
        return builder(num_classes=num_classes, input_shape=tuple(input_shape), **cfg.options)
    except TypeError as exc:
        raise ConfigError(f"model {cfg.name!r} rejected its options {cfg.options}: {exc}") from None
