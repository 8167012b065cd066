"""The released code's Sharp MinMax as a grid entry: the packaged preset ``sharp_minmax_paper_code``.

``reproduce ablation`` takes the preset apart switch by switch; ``reproduce table --sweep`` adds
the whole preset as a cell of its own (:func:`paper_code_entry`). Both read it here.
"""
from __future__ import annotations

import copy
from typing import Any

from sharp_unlearn.config import config_from_dict, merge
from sharp_unlearn.errors import ConfigError

#: the packaged preset holding the released code's Sharp MinMax settings
PRESET = "sharp_minmax_paper_code"
#: the Sharp MinMax switches, each defaulting to the project's behaviour; the preset sets all of them
SWITCHES = ("mask_order", "forget_mask_scope", "forget_perturbation", "update_order")


def preset_parts(preset: dict[str, Any], source: str,
                 unlearn_train: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method section, optimizer section) of the paper-code preset.

    Only those two vary per arm. A ``train`` section must already hold for every unlearning run
    (``unlearn_train``: the spec's resolved train section), else the arms would differ in more than
    their label says; anything else is refused.
    """
    extra = sorted(k for k in preset if k not in ("method", "optimizer", "train"))
    if extra:
        raise ConfigError(f"preset {source!r} sets {', '.join(extra)}; the ablation varies only the method "
                          "and optimizer sections per arm (expected no other top-level keys but train)")
    for key, value in (preset.get("train") or {}).items():
        have = getattr(unlearn_train, key, None) if unlearn_train is not None else None
        if have != value:
            raise ConfigError(f"preset {source!r} sets train.{key}={value!r}, but the unlearning runs use "
                              f"train.{key}={have!r}; expected the spec's unlearn.train to match (the train "
                              "section is shared by every arm)")
    method = dict(preset.get("method") or {})
    if method.get("name", "sharp_minmax") != "sharp_minmax":
        raise ConfigError(f"preset {source!r} has method.name={method['name']!r}; expected sharp_minmax")
    method.pop("name", None)
    missing = [s for s in SWITCHES if s not in method]
    if missing:
        raise ConfigError(f"preset {source!r} does not set method.{missing[0]}; expected all of: "
                          f"{', '.join('method.' + s for s in SWITCHES)}")
    return method, dict(preset.get("optimizer") or {})


def unlearn_train(spec: dict[str, Any]) -> Any:
    """The train section every unlearning run of ``spec`` uses (the pretraining one, then ``unlearn.train``)."""
    return config_from_dict(merge(spec["base"], {"train": (spec.get("unlearn") or {}).get("train") or {},
                                                 "tracking": {"enabled": False}})).train


def with_optimizer(entry: dict[str, Any], optimizer: dict[str, Any]) -> dict[str, Any]:
    """A grid entry with the preset's optimizer section: its name becomes the entry's only optimizer."""
    out = copy.deepcopy(entry)
    optimizer = dict(optimizer)
    name = optimizer.pop("name", None)
    if name:
        out["optimizers"] = [name]
    if optimizer:
        out["optimizer"] = merge(out.get("optimizer") or {}, optimizer)
    return out


def paper_code_entry(entry: dict[str, Any], preset: dict[str, Any], source: str = PRESET,
                     train: Any = None) -> dict[str, Any]:
    """A Sharp MinMax grid entry with the whole paper-code preset applied (method and optimizer)."""
    paper_method, paper_optimizer = preset_parts(preset, source, train)
    return with_optimizer(merge(dict(entry or {}), paper_method), paper_optimizer)
