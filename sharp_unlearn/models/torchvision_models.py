"""``model.name=torchvision:<arch>``: any classification model ``torchvision.models`` builds.

``model.options`` go to the builder (``torchvision.models.get_model(arch, **options)``).
``model.weights`` is a state-dict file, or a torchvision weights name (``IMAGENET1K_V1``,
``DEFAULT``, ``ResNet18_Weights.IMAGENET1K_V1``) read from torch's local cache
(``$TORCH_HOME/hub/checkpoints``, where ``torchvision`` itself stores downloads); a name that is not
cached is an error unless ``model.download=true``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models.sources import Source, options_with_classes, register_source, rejected_options


def _architectures() -> list[str]:
    import torchvision.models as models

    return models.list_models(module=models)  # classification only (not detection, segmentation, video)


def check(arch: str) -> None:
    names = _architectures()
    if arch not in names:
        raise ConfigError(f"model.name='torchvision:{arch}' is not a torchvision classification model; "
                          f"expected one of: {', '.join(names)}")


def build(arch: str, cfg, num_classes: int | None) -> nn.Module:
    import torchvision.models as models

    check(arch)
    options = options_with_classes(cfg.options, num_classes)
    try:
        return models.get_model(arch, weights=None, **options)
    except (TypeError, ValueError) as exc:
        raise rejected_options(cfg.name, options, exc) from None


def named_weights(arch: str, name: str, download: bool) -> dict[str, torch.Tensor]:
    import torchvision.models as models

    try:
        weights = models.get_weight(name) if "." in name else models.get_model_weights(arch)[name]
    except (KeyError, ValueError, AttributeError):
        known = list(models.get_model_weights(arch).__members__)
        raise ConfigError(f"model.weights={name!r} is neither a file nor a weights name of torchvision:{arch}; "
                          f"expected a state-dict path or one of: {', '.join(known)}") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    if not download:
        raise ConfigError(f"model.weights={name!r} ({weights}) is not in the local cache ({cached}); expected it "
                          "there (set model.download=true once to fetch it) or a state-dict file")
    return weights.get_state_dict(progress=False)


register_source(Source("torchvision", "<arch>", check, build, named_weights))
