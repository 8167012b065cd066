"""``model.name=hf:<local dir or hub id>``: a Hugging Face image classifier, offline.

``transformers.AutoModelForImageClassification.from_pretrained(target, local_files_only=True,
**model.options)``: a directory written by ``save_pretrained`` or a hub id already in the local
Hugging Face cache; nothing is downloaded. ``transformers`` is an optional extra
(``pip install 'sharp-unlearn[hf]'``). The head is the model's ``classifier``.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models.sources import Source, register_source, rejected_options


def _auto_class():
    try:
        from transformers import AutoModelForImageClassification
    except ImportError:
        raise ConfigError("model.name='hf:...' needs the optional package 'transformers'; expected it installed "
                          "(pip install 'sharp-unlearn[hf]')") from None
    return AutoModelForImageClassification


def check(target: str) -> None:
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name='hf:{target}' is a directory without config.json; expected a "
                              "directory written by save_pretrained")
        return
    if path.exists() or target.startswith((".", "/", "~")) or target.count("/") > 1:
        raise ConfigError(f"model.name='hf:{target}' is not a directory; expected a save_pretrained directory "
                          "or a hub id (org/name) in the local Hugging Face cache")


def build(target: str, cfg, num_classes: int | None) -> nn.Module:
    auto = _auto_class()
    check(target)
    path = Path(target).expanduser()
    try:
        return auto.from_pretrained(str(path) if path.is_dir() else target, local_files_only=True, **cfg.options)
    except TypeError as exc:
        raise rejected_options(cfg.name, cfg.options, exc) from None
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise ConfigError(f"model.name='hf:{target}' cannot be loaded offline ({first}); expected a "
                          "save_pretrained directory or a hub id in the local cache") from None


def enable_checkpointing(module: nn.Module) -> bool:
    """Hugging Face's own switch, non-reentrant (the training loop takes gradients with
    torch.autograd.grad); False for a model that does not support it."""
    if not getattr(module, "supports_gradient_checkpointing", False):
        return False
    kwargs = {"use_reentrant": False}
    if hasattr(module, "activation_checkpointing_enable"):  # transformers 5 renamed it
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return True


register_source(Source("hf", "<local dir or cached hub id>", check, build, enable_checkpointing=enable_checkpointing))
