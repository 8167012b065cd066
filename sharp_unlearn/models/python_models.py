"""``model.name=python:<module>:<callable>``: a model from the user's own code.

``<module>`` is an importable module (``mypkg.models``) or a ``.py`` file; ``<callable>`` (a
function or class, dotted for nested attributes) is called with ``model.options`` as keyword
arguments, plus ``num_classes`` (the data's) when it takes that argument and the options do not
set it. It must return a ``torch.nn.Module`` whose forward maps a batch of images to logits.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from torch import nn

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models.sources import Source, options_with_classes, register_source, rejected_options


def _parts(target: str) -> tuple[str, str]:
    module, sep, attr = target.rpartition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"model.name='python:{target}' is malformed; expected python:<module>:<callable>")
    return module, attr


def _module(name: str):
    if name.endswith(".py"):
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"model.name module file {name!r} does not exist; expected a .py file "
                              "or an importable module")
        key = f"sharp_unlearn_user_model_{abs(hash(str(path)))}"
        if key in sys.modules:
            return sys.modules[key]
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):  # the module itself, not one of its imports
            raise ConfigError(f"model.name module {name!r} is not importable; expected a module on the Python path "
                              "(PYTHONPATH) or a .py file") from None
        raise


def resolve(target: str) -> Any:
    module_name, attr = _parts(target)
    obj: Any = _module(module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model.name='python:{target}': module {module_name!r} has no attribute {attr!r}; "
                              "expected a callable returning a torch.nn.Module")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model.name='python:{target}' is a {type(obj).__name__}, not callable; expected a "
                          "function or class returning a torch.nn.Module")
    return obj


def check(target: str) -> None:
    resolve(target)


def _takes_num_classes(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "num_classes" in params


def build(target: str, cfg, num_classes: int | None) -> nn.Module:
    fn = resolve(target)
    options = options_with_classes(cfg.options, num_classes) if _takes_num_classes(fn) else dict(cfg.options)
    try:
        module = fn(**options)
    except TypeError as exc:
        raise rejected_options(cfg.name, options, exc) from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model.name='python:{target}' returned a {type(module).__name__}; expected a "
                          "torch.nn.Module")
    return module


register_source(Source("python", "<module>:<callable>", check, build))
