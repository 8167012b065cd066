"""Activation checkpointing (``model.activation_checkpointing=true``): memory for compute.

A checkpointed block keeps only its input in the forward pass and runs its forward again in the
backward pass to get the activations its gradient needs, so activation memory grows with the
number of blocks' inputs instead of every intermediate tensor. Gradients are the same.

- ``timm:`` models use their own ``set_grad_checkpointing()``, ``hf:`` models
  ``gradient_checkpointing_enable`` (each source's ``enable_checkpointing``);
- everything else (``torchvision:``, ``python:``, the built-in models, and a timm / Hugging Face
  model without its own switch) checkpoints its top-level blocks (:func:`top_level_blocks`) with
  :func:`checkpoint_blocks`.

Checkpoints are non-reentrant everywhere: the training loop takes gradients with
``torch.autograd.grad``, which reentrant checkpoints refuse.

Recomputing runs a BatchNorm layer's forward a second time, which in train mode would update its
running statistics twice per step. :func:`guard_batchnorm` stops that: a BatchNorm call made outside
the model's own forward call (with checkpointing, only a recomputation inside the backward pass
does that) runs exactly as the forward call did and then gets its running statistics (and
``num_batches_tracked``) put back. Switching tracking off instead, as SAM's second pass does
(:func:`~sharp_unlearn.optim.sam.frozen_bn_stats`), would change which tensors batch_norm saves for
the backward pass, and the checkpoint refuses a recomputation that saves other tensors than the
forward did. SAM's second pass recomputes inside its own frozen block, where both passes agree.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sharp_unlearn.errors import ConfigError

#: containers whose children run one after another: their composite children are the blocks
_STACKS = (nn.Sequential, nn.ModuleList)


def top_level_blocks(module: nn.Module) -> list[str]:
    """Module paths of the blocks to checkpoint: the children that hold modules of their own (a
    ResNet's residual blocks, a ViT's encoder blocks) of the outermost ``Sequential`` /
    ``ModuleList`` stacks; a stack of plain layers (convolutions, norms) is looked through."""
    blocks: list[str] = []

    def visit(prefix: str, sub: nn.Module) -> None:
        children = list(sub.named_children())
        if isinstance(sub, _STACKS) and any(next(child.children(), None) is not None for _, child in children):
            blocks.extend(f"{prefix}{name}" for name, child in children if next(child.children(), None) is not None)
            return
        for name, child in children:
            visit(f"{prefix}{name}.", child)

    visit("", module)
    return blocks


class CheckpointedForward:
    """A block's forward under ``torch.utils.checkpoint``, set as the block's own ``forward``.

    A module-level class rather than a closure, so a model with checkpointed blocks still deep-copies
    (SCRUB's teacher) and pickles (MLflow model logging). Without gradients (evaluation) the block
    runs as it is: there is no backward pass to save memory for.
    """

    def __init__(self, block: nn.Module):
        self.block = block

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.block).forward(self.block, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.run(*args, **kwargs)
        return checkpoint(self.run, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(module: nn.Module, label: str) -> list[str]:
    """Checkpoint every :func:`top_level_blocks` block of ``module``; returns their paths."""
    blocks = top_level_blocks(module)
    if not blocks:
        raise ConfigError(f"model.activation_checkpointing=true but {label} has no blocks to checkpoint; expected "
                          "a model built from Sequential / ModuleList stacks of blocks (set it to false)")
    for path in blocks:
        block = module.get_submodule(path)
        block.forward = CheckpointedForward(block)
    return blocks


class _BatchNormGuard:
    """Hooks sharing one count of the model's own forward calls in progress (see the module docstring).

    Bound methods of one object, not closures: a deep copy of the model copies the guard with it and
    the copy's hooks share the copy's count."""

    def __init__(self) -> None:
        self.forward_calls = 0
        #: id(norm) -> its statistics before a recomputation, put back after it
        self.saved: dict[int, list[torch.Tensor]] = {}

    def model_enter(self, _module: nn.Module, _args: Any) -> None:
        self.forward_calls += 1

    def model_leave(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        self.forward_calls -= 1

    def norm_enter(self, norm: nn.Module, _args: Any) -> None:
        if self.forward_calls == 0 and norm.training and norm.track_running_stats:
            self.saved[id(norm)] = [b.detach().clone() for b in _statistics(norm)]

    def norm_leave(self, norm: nn.Module, _args: Any, _output: Any) -> None:
        saved = self.saved.pop(id(norm), None)
        if saved is not None:
            for buffer, value in zip(_statistics(norm), saved):
                # through .data: the recomputed graph holds these buffers, and a tracked in-place
                # write would fail its version check in the backward pass (which reads only the
                # batch statistics, so the values it holds do not matter)
                buffer.data.copy_(value)


def _statistics(norm: nn.Module) -> list[torch.Tensor]:
    return [b for b in (norm.running_mean, norm.running_var, norm.num_batches_tracked) if b is not None]


def guard_batchnorm(model: nn.Module) -> bool:
    """Keep recomputations from updating ``model``'s BatchNorm running statistics; False when it has none."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    guard = _BatchNormGuard()
    # always_call: a forward that raises must still leave the count, or later recomputations would look
    # like forward calls
    model.register_forward_pre_hook(guard.model_enter)
    model.register_forward_hook(guard.model_leave, always_call=True)
    for norm in norms:
        norm.register_forward_pre_hook(guard.norm_enter)
        norm.register_forward_hook(guard.norm_leave, always_call=True)
    return True


def enable_activation_checkpointing(model: nn.Module, module: nn.Module,
                                    native: Callable[[nn.Module], bool] | None, label: str) -> None:
    """Checkpoint ``module`` (the model itself, or the module an external model wraps) with the
    family's own switch ``native`` (returns False where the model has none) or its top-level blocks,
    and guard ``model``'s BatchNorm statistics against the recomputations."""
    if native is None or not native(module):
        checkpoint_blocks(module, label)
    guard_batchnorm(model)
