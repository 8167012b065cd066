"""The model contract: every registered model splits into features + head.

``forward(x) == head(features(x))``; ``features`` returns the penultimate
representation (a ``[batch, feature_dim]`` tensor) that entanglement metrics
and UMAP plots use.
"""
from __future__ import annotations

import torch
from torch import nn

from sharp_unlearn.errors import ConfigError, shape_mismatch
from sharp_unlearn.registry import Registry

#: name -> builder(num_classes: int, input_shape: tuple, **params) -> FeatureModel
MODELS: Registry = Registry("model")


class FeatureModel(nn.Module):
    """Base class: subclasses define ``self.body`` (to features) and ``self.head``."""

    feature_dim: int

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def is_partitioned(model: torch.nn.Module) -> bool:
    """True when ZeRO-3 partitioned the parameters at construction (``deepspeed.zero.Init``): each rank
    holds only its slice and ``p.data`` is empty."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load weights, turning an architecture mismatch into a one-line ConfigError naming ``source``.

    A model built partitioned (ZeRO-3) is loaded one module at a time: its parameters are gathered,
    rank 0 copies the values in and they are partitioned again on leaving (so a whole copy of at most
    one module's parameters exists at once); buffers are not partitioned and load on every rank.
    """
    own = model.state_dict(keep_vars=True)
    detail = shape_mismatch({k: tuple(getattr(v, "ds_shape", v.shape)) for k, v in own.items()},
                            {k: tuple(v.shape) for k, v in state.items()})
    if detail:
        raise ConfigError(f"{source} does not match the model architecture ({detail})")
    if not is_partitioned(model):
        model.load_state_dict(state)
        return
    import deepspeed  # lazy: heavy optional dependency, only a ZeRO-3 run builds partitioned models

    rank = torch.distributed.get_rank()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        params = dict(module.named_parameters(recurse=False))
        with torch.no_grad():
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                if rank == 0:  # the modifier rank's values are what every rank's partition gets
                    for name, param in params.items():
                        param.copy_(state[dot + name])
            for name, buffer in module.named_buffers(recurse=False):
                if dot + name in state:  # non-persistent buffers are in no state dict
                    buffer.copy_(state[dot + name])
