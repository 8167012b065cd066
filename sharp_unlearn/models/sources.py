"""Model sources: ``model.name=<source>:<target>`` builds a model this package does not define.

=================================  ===========================================================
``torchvision:<arch>``             any classification builder of ``torchvision.models``
``timm:<name>``                    ``timm.create_model`` (optional extra ``timm``)
``hf:<local dir or cached id>``    ``AutoModelForImageClassification``, offline (extra ``hf``)
``python:<module>:<callable>``     the callable (``model.options`` as keyword arguments)
=================================  ===========================================================

A source turns ``<target>`` into a bare ``nn.Module`` (:class:`Source.build`); loading
``model.weights``, fitting the head to the data's classes and the feature hook are common to all of
them (:func:`build_external`). Nothing is downloaded unless ``model.download=true``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models.checkpointing import enable_activation_checkpointing
from sharp_unlearn.models.external import ExternalModel, find_head, fit_head, load_into, load_weights_file
from sharp_unlearn.registry import Registry

#: file suffixes that make ``model.weights`` a path even before the file is looked for
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Source:
    name: str
    #: ``<target>`` as written after ``<source>:``, for messages
    usage: str
    #: config-time validation of the target (cheap: no model is built)
    check: Callable[[str], None]
    #: ``build(target, cfg, num_classes)``: the bare module, its head built for ``num_classes`` where the
    #: builder takes that argument and ``model.options`` do not set it
    build: Callable[[str, Any, int | None], nn.Module]
    #: ``named_weights(target, name, download)``: a state dict for a weights *name* (not a file); None:
    #: this source takes files only
    named_weights: Callable[[str, str, bool], dict[str, torch.Tensor]] | None = None
    #: ``enable_checkpointing(module)``: turn on the family's own activation checkpointing; False where the
    #: module has none (then its top-level blocks are checkpointed, see models/checkpointing.py)
    enable_checkpointing: Callable[[nn.Module], bool] | None = None


#: source name -> Source
SOURCES: Registry[Source] = Registry("model source")


def register_source(source: Source) -> Source:
    return SOURCES.register(source.name)(source)


def split_name(name: str) -> tuple[Source, str]:
    """``torchvision:resnet18`` -> (the torchvision source, ``resnet18``)."""
    prefix, _, target = name.partition(":")
    if prefix not in SOURCES.names():
        raise ConfigError(f"model.name={name!r} names an unknown model source {prefix!r}; expected one of: "
                          + ", ".join(f"{s}:{SOURCES.get(s).usage}" for s in SOURCES.names()))
    source = SOURCES.get(prefix)
    if not target.strip():
        raise ConfigError(f"model.name={name!r} has no target; expected {prefix}:{source.usage}")
    return source, target


def is_external(name: str) -> bool:
    return ":" in name


def check_name(name: str) -> None:
    """Config-time check of ``model.name`` for a source (unknown source, arch, module or callable)."""
    source, target = split_name(name)
    source.check(target)


def weights_is_file(weights: str) -> bool:
    return ("/" in weights or "\\" in weights or weights.endswith(WEIGHT_SUFFIXES) or weights.startswith(".")
            or Path(weights).expanduser().exists())


def build_external(cfg, num_classes: int, input_shape: tuple[int, ...], *, load_weights: bool = True):
    """The configured external model, wrapped as an :class:`~sharp_unlearn.models.external.ExternalModel`.

    ``load_weights=False`` skips ``model.weights`` (the caller loads a checkpoint of this model next).
    """
    source, target = split_name(cfg.name)
    weights = cfg.weights if load_weights else None
    # the head is built at the data's size; weights with another head size resize it to load (load_into),
    # then it is refitted (fit_head): the same result as building at the weights' size, and a user's
    # callable that requires num_classes gets it either way
    module = source.build(target, cfg, num_classes)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model.name={cfg.name!r} returned a {type(module).__name__}; expected a torch.nn.Module")
    head_path = find_head(module, cfg.feature_layer, cfg.name)
    if weights:
        if weights_is_file(weights):
            state = load_weights_file(Path(weights).expanduser(), cfg.name)
            label = f"model.weights={weights!r}"
        elif source.named_weights is not None:
            state = source.named_weights(target, weights, cfg.download)
            label = f"model.weights={weights!r} ({cfg.name})"
        else:
            raise ConfigError(f"model.weights={weights!r} is not a file; expected a path to a state-dict file "
                              f"for {cfg.name} (this source has no named weights)")
        load_into(module, state, head_path, label)
    fit_head(module, head_path, num_classes, cfg.name)
    model = ExternalModel(module, label=cfg.name, input_shape=tuple(input_shape), num_classes=num_classes,
                          feature_layer=head_path, input_size=cfg.input_size, input_channels=cfg.input_channels)
    model.check_outputs()
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model, module, source.enable_checkpointing, cfg.name)
    return model


def options_with_classes(options: dict[str, Any], num_classes: int | None) -> dict[str, Any]:
    """``model.options`` plus ``num_classes`` unless the user set it."""
    if num_classes is None or "num_classes" in options:
        return dict(options)
    return {**options, "num_classes": num_classes}


def rejected_options(name: str, options: dict[str, Any], exc: Exception) -> ConfigError:
    return ConfigError(f"model {name!r} rejected its options {options}: {str(exc).splitlines()[0][:200]}")


def model_tags(cfg, kind: str = "pretrain") -> dict[str, str]:
    """Run tags saying where a trained model starts (``cfg`` is a ModelConfig).

    ``init``: ``pretrained`` (``model.weights`` loaded: training is fine-tuning) or ``scratch``;
    ``init_weights``: the file or weights name; ``model_source``: ``builtin`` or the source. A retrained
    reference (``kind="retrain"``) from given weights fine-tunes those same weights on the retain set,
    and ``reference_recipe`` says so.
    """
    source = cfg.name.partition(":")[0] if is_external(cfg.name) else "builtin"
    tags = {"model_source": source, "init": "pretrained" if cfg.weights else "scratch"}
    if cfg.weights:
        tags["init_weights"] = str(cfg.weights)
        if kind == "retrain":
            tags["reference_recipe"] = "fine-tuned from init_weights on the retain set"
    elif kind == "retrain":
        tags["reference_recipe"] = "trained from scratch on the retain set"
    return tags


def path_safe_name(name: str) -> str:
    """``model.name`` as one path component: a source's target may hold ``/`` and ``:``
    (``hf:/models/vit``), which would nest folders or be refused by some file systems."""
    import re

    safe = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_")
    return safe[-80:] or "model"
