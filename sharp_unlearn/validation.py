"""Registry checks of a config: the names config.py cannot resolve, and each method's own settings.

``sharp_unlearn.config`` validates shape (types, ranges, choices of the common
keys) and imports no registry. This layer, above it and the registries, checks
what only they know: ``data.name``, ``model.name``, ``method.name`` and the
method-specific settings of the ``method`` section, which each method declares
next to its code (``UnlearningMethod.params_class``). Every entry point that
builds a config from user input (commands, the API, sweeps, grid specs) loads it
through ``load_config`` / ``config_from_dict`` here, so a bad name or value
fails with one ConfigError line (exit 2) before anything is written or trained.

Any registered method's settings are accepted in the ``method`` section, whatever
method is chosen (RUM hands them to its group methods; presets and grid specs
share one section between methods), and the resolved section carries every
method's defaults: so the flattened params and the config hash do not depend on
which settings a user spelled out.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from sharp_unlearn import config
from sharp_unlearn.config import ExperimentConfig, MethodConfig, build_section
from sharp_unlearn.data import DATASETS
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.methods import METHODS
from sharp_unlearn.models import check_model_name


def shared_method_keys() -> list[str]:
    """Keys of the method section the framework reads for every method (MethodConfig's own fields)."""
    return [f.name for f in dataclasses.fields(MethodConfig) if f.name != MethodConfig.open_params_field]


def method_param_classes() -> dict[str, type]:
    """Each method-specific key and the params class (of one registered method) that declares it."""
    owners: dict[str, str] = {}
    classes: dict[str, type] = {}
    shared = set(shared_method_keys())
    for name in METHODS.names():
        params_class = METHODS.get(name).params_class
        if params_class is None:
            continue
        for f in dataclasses.fields(params_class):
            if f.name in shared or (f.name in owners and classes[f.name] is not params_class):
                first = "the shared method section" if f.name in shared else f"method {owners[f.name]!r}"
                raise RuntimeError(f"method {name!r} declares setting {f.name!r}, which {first} already has")
            owners.setdefault(f.name, name)
            classes[f.name] = params_class
    return classes


def resolve_method(method: MethodConfig) -> MethodConfig:
    """``method`` with its name checked, every method-specific key typed and checked by the method that
    declares it, and every registered method's defaults filled in (a ConfigError names a bad key/value)."""
    METHODS.get(method.name)  # raises with the list of known names
    classes = method_param_classes()
    unknown = sorted(set(method.params) - set(classes))
    if unknown:
        known = sorted([*shared_method_keys(), *classes])
        raise ConfigError(f"unknown key method.{unknown[0]} in method; expected one of: {', '.join(known)}")
    params: dict[str, Any] = {}
    for params_class in dict.fromkeys(classes.values()):  # each class once, in registry order
        declared = {f.name for f in dataclasses.fields(params_class)}
        given = {k: v for k, v in method.params.items() if k in declared}
        params.update(dataclasses.asdict(build_section(params_class, given, "method")))
    return dataclasses.replace(method, params=params)


def check_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with its registry names checked and its method section resolved (``resolve_method``)."""
    DATASETS.get(cfg.data.name)  # raises with the list of known names
    check_model_name(cfg.model.name)
    if cfg.method is None:
        return cfg
    return dataclasses.replace(cfg, method=resolve_method(cfg.method))


def config_from_dict(tree: dict[str, Any]) -> ExperimentConfig:
    """``config.config_from_dict`` and the registry checks (``check_config``)."""
    return check_config(config.config_from_dict(tree))


def load_config(paths: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = (),
                base: dict[str, Any] | None = None) -> ExperimentConfig:
    """``config.load_config`` and the registry checks (``check_config``)."""
    return check_config(config.load_config(list(paths), list(overrides), base=base))
