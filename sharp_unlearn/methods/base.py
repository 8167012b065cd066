"""The method contract: a method describes objectives; the engine optimizes them.

A method is one file: its class, registered by name in ``METHODS``, and, when
it reads settings of its own, a dataclass of them named by its
``params_class`` (types, defaults and range checks in ``__post_init__``, with
``config.check_range`` / ``config.check_choice``). Their keys are written in the
``method`` section like the shared ones (``method.temperature=2``);
``sharp_unlearn.validation`` checks them at load time and the method reads
them typed from ``self.params``. No other file changes to add a method.

A method is constructed from the run's MethodConfig and OptimizerConfig,
``prepare`` sees the model about to be unlearned (to build masks, a teacher,
random labels...), and ``phases(epoch)`` returns what to optimize that epoch.

What the unlearn recipe does with a method (the whole contract)::

    method = METHODS.get(cfg.method.name)(cfg.method, cfg.optimizer, sam_spec(cfg.optimizer))
    if method.from_scratch:            # "retrain": the cached reference IS the result
        ...
    else:
        extra = method.prepare(ctx)    # None, or {stream name: Dataset} to add to the streams
        datasets = {"retain": ctx.retain, "forget": ctx.forget, **(extra or {})}
        run_stage(model, method.phases, datasets, epochs=method.epochs, ...)  # epochs read AFTER prepare

``phases(epoch)`` may be called several times per epoch (and once for epoch 0
before training, to size the lr schedule): it must be cheap and must not
change state except for a method's own lazy, memoised preparation (RUM).
Masks are built once in ``prepare`` and reused (the engine caches a mask by
identity).

``ctx.extras`` keys a method may read: ``forget_scores`` (memorization score
per forget example, aligned with ``ctx.forget``; RUM needs it), ``split``
(the ForgetSplit: its ``split_hash`` checks a loaded mask), ``mask_meta``
(the metadata of ``ctx.mask`` when the recipe loaded it from a file).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from sharp_unlearn.config import MethodConfig, OptimizerConfig, build_section
from sharp_unlearn.engine.objective import Batch, Phase, SamSpec
from sharp_unlearn.engine.saliency import forget_gradient_saliency
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.optim.saliency import check_mask, load_mask, saliency_mask
from sharp_unlearn.registry import Registry

#: name -> UnlearningMethod subclass
METHODS: Registry = Registry("unlearning method")


@dataclass
class UnlearnContext:
    """What a method may look at before unlearning starts."""

    model: nn.Module
    retain: Dataset
    forget: Dataset
    num_classes: int
    device: torch.device
    seed: int
    batch_size: int = 64
    #: optional precomputed saliency mask {param name: 0/1 tensor}
    mask: dict[str, torch.Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    #: the forget set without training augmentation (same order as ``forget``), for
    #: measurements such as saliency masks; None means ``forget`` has no augmentation
    forget_eval: Dataset | None = None


class UnlearningMethod:
    #: streams this method reads; "retain" and/or "forget"
    streams: tuple[str, ...] = ("retain", "forget")
    #: True for "retrain": the recipe trains from scratch on the retain set (no phases)
    from_scratch: bool = False
    #: dataclass of this method's own settings (keys of the method section), or None when it has none
    params_class: type | None = None

    def __init__(self, cfg: MethodConfig, optimizer: OptimizerConfig, sam: SamSpec | None):
        self.cfg = cfg
        #: this method's own settings, typed and checked (defaults where the section leaves them out)
        self.params = method_params(self.params_class, cfg) if self.params_class is not None else None
        self.optimizer_cfg = optimizer
        #: SAM semantics of the run's optimizer (None for sgd/adam/adamw)
        self.sam = sam

    def prepare(self, ctx: UnlearnContext) -> dict[str, Dataset] | None:
        """Build whatever the objectives need (default: nothing).

        May return extra data streams ``{name: Dataset}`` the phases read
        (RUM's per-group forget streams); the recipe adds them to run_stage's.
        """
        return None

    def phases(self, epoch: int) -> list[Phase]:
        raise NotImplementedError

    @property
    def optimizer_tag(self) -> str:
        """The MLflow ``optimizer`` tag for runs of this method."""
        return self.optimizer_cfg.tag

    @property
    def epochs(self) -> int:
        return self.cfg.epochs


def method_params(params_class: type, cfg: MethodConfig):
    """``params_class`` built from the keys of ``cfg.params`` it declares (others belong to other methods)."""
    declared = {f.name for f in fields(params_class)}
    return build_section(params_class, {k: v for k, v in cfg.params.items() if k in declared}, "method")


def saliency_mask_for(ctx: UnlearnContext, cfg: MethodConfig) -> dict[str, torch.Tensor]:
    """The saliency mask of a masked method (SalUn, Sharp MinMax), validated against the model.

    In order: ``ctx.mask`` (given by the recipe), else ``cfg.mask_path`` (a file
    from ``sharp-unlearn mask``), else computed now from the forget gradient at
    the current weights. A mask file must have been made for the same fraction,
    the same order (``method.mask_order``) and the same forget split.
    """
    split = ctx.extras.get("split")
    split_hash = getattr(split, "split_hash", None)
    if ctx.mask is not None:
        mask, meta, source = ctx.mask, ctx.extras.get("mask_meta") or {}, "the given mask"
    elif cfg.mask_path:
        mask, meta = load_mask(cfg.mask_path)
        source = f"mask file {cfg.mask_path!r}"
    else:
        measured_on = ctx.forget_eval if ctx.forget_eval is not None else ctx.forget
        scores = forget_gradient_saliency(ctx.model, measured_on, ctx.device, max(ctx.batch_size, 256))
        return saliency_mask(scores, cfg.mask_fraction, cfg.mask_order)
    fraction = meta.get("fraction")
    if fraction is not None and abs(float(fraction) - cfg.mask_fraction) > 1e-9:
        raise ConfigError(f"{source} marks fraction {fraction:g} but method.mask_fraction={cfg.mask_fraction:g}; "
                          f"set method.mask_fraction={fraction:g} or use the matching mask file")
    # files written before the order was a setting hold the largest entries
    order = meta.get("order", "largest") if meta else None
    if order is not None and order != cfg.mask_order:
        raise ConfigError(f"{source} keeps the {order} saliencies but method.mask_order={cfg.mask_order!r}; "
                          f"set method.mask_order={order} or make a matching mask with `sharp-unlearn mask`")
    if split_hash is not None and meta.get("split_hash") not in (None, split_hash):
        raise ConfigError(f"{source} was computed for forget split {meta['split_hash']!r}, "
                          f"but this run forgets split {split_hash!r}; recompute it with `sharp-unlearn mask`")
    return check_mask(mask, ctx.model, source)


def scaled(loss_fn, weight: float):
    """``weight * loss_fn`` (negative weights make ascent objectives)."""

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return weight * loss_fn(model, batch)

    return loss
