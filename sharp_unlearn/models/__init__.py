"""Model registry: every model exposes ``features(x)`` (penultimate) and ``head``.

``model.name`` is a built-in name (the registry) or ``<source>:<target>`` for a model this package
does not define (torchvision, timm, Hugging Face, a user's callable; see ``models/sources.py``).
"""
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models import (  # noqa: F401  (register members)  # noqa: F401,E402
    hf_models,
    mlp,
    python_models,
    resnet,
    small_cnn,
    timm_models,
    torchvision_models,
    two_layer_cnn,  # noqa: F401,E402
    vgg,
    vit,
)
from sharp_unlearn.models.base import MODELS, FeatureModel, load_model_state
from sharp_unlearn.models.checkpointing import enable_activation_checkpointing
from sharp_unlearn.models.external import load_weights_file
from sharp_unlearn.models.sources import SOURCES, build_external, check_name, is_external

__all__ = ["MODELS", "SOURCES", "FeatureModel", "build_model", "check_model_name"]


def check_model_name(name: str) -> None:
    """Config-time check of ``model.name`` (a ConfigError naming the value and what was expected)."""
    if is_external(name):
        check_name(name)
        return
    try:
        MODELS.get(name)
    except ConfigError as exc:
        sources = ", ".join(f"{s}:{SOURCES.get(s).usage}" for s in SOURCES.names())
        raise ConfigError(f"{exc}; or a model source: {sources}") from None


def build_model(cfg, num_classes: int, input_shape: tuple[int, ...], *, load_weights: bool = True) -> FeatureModel:
    """Build the configured model (``cfg`` is a ModelConfig).

    ``load_weights=False`` skips ``model.weights`` (the caller loads a checkpoint of this model next,
    so the weights file need not exist any more).
    """
    if is_external(cfg.name):
        return build_external(cfg, num_classes, tuple(input_shape), load_weights=load_weights)
    builder = MODELS.get(cfg.name)
    try:
        model = builder(num_classes=num_classes, input_shape=tuple(input_shape), **cfg.options)
    except TypeError as exc:
        raise ConfigError(f"model {cfg.name!r} rejected its options {cfg.options}: {exc}") from None
    if cfg.weights and load_weights:
        load_model_state(model, load_weights_file(cfg.weights, cfg.name), f"model.weights={cfg.weights!r}")
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model, model, None, cfg.name)
    return model
