"""``model.name=timm:<name>``: ``timm.create_model(name, pretrained=False, **model.options)``.

timm is an optional extra (``pip install 'sharp-unlearn[timm]'``). ``model.weights`` is a
state-dict file (for example timm's ``pytorch_model.bin`` / ``model.safetensors`` from a local
copy of the hub repository); the head is found with ``get_classifier()``.
"""
from __future__ import annotations

from torch import nn

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models.sources import Source, options_with_classes, register_source, rejected_options


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("model.name='timm:...' needs the optional package 'timm'; expected it installed "
                          "(pip install 'sharp-unlearn[timm]')") from None
    return timm


def check(name: str) -> None:
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"model.name='timm:{name}' is not a timm model; expected a timm.list_models() name"
                          + (f" such as {', '.join(close)}" if close else ""))


def build(name: str, cfg, num_classes: int | None) -> nn.Module:
    check(name)
    options = options_with_classes(cfg.options, num_classes)
    try:
        return _timm().create_model(name, pretrained=False, **options)
    except (TypeError, ValueError) as exc:
        raise rejected_options(cfg.name, options, exc) from None


def enable_checkpointing(module: nn.Module) -> bool:
    """timm's own switch (blocks checkpointed inside the model's forward); False for a model without one."""
    setter = getattr(module, "set_grad_checkpointing", None)
    if not callable(setter):
        return False
    try:
        setter(True)
    except (NotImplementedError, AssertionError):  # timm models that do not implement it say so this way
        return False
    layers = _timm().layers
    # TIMM_REENTRANT_CKPT=1 makes timm checkpoint reentrantly, which the training loop's
    # torch.autograd.grad refuses
    if getattr(layers, "use_reentrant_ckpt", lambda: False)():
        layers.set_reentrant_ckpt(False)
    return True


register_source(Source("timm", "<name>", check, build, enable_checkpointing=enable_checkpointing))
