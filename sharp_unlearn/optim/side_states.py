"""Several base-optimizer states on one optimizer object, saved with its state_dict.

Sequential updates (Sharp MinMax's ``method.update_order=sequential``: a
retain step, then a forget step, as the paper's released code does with two
optimizers) need one momentum / Adam state per side. Keeping one optimizer
object and swapping its ``state`` per side keeps everything else shared (the
parameter groups the lr schedule edits, the engine's references), and works
for any torch optimizer, including the one DeepSpeed's ZeRO wrappers step
over their flat fp32 partitions.

The side states travel inside ``optimizer.state_dict()`` under
``"side_states"`` (state-dict hooks), so every checkpoint writer that saves
the optimizer's state dict saves them and a resume restores them. A run with
one side adds nothing: its checkpoints are unchanged.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

SIDE_STATES_KEY = "side_states"


class SideStates:
    """Named extra states for ``optimizer``; the optimizer's own state is the default side's."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        #: side name -> a state mapping shaped like ``optimizer.state`` (param -> dict)
        self.states: dict[str, defaultdict] = {}
        optimizer.register_state_dict_post_hook(self._add_to_state_dict)
        optimizer.register_load_state_dict_pre_hook(self._take_from_state_dict)
        self._pending: dict[str, dict] | None = None
        optimizer.register_load_state_dict_post_hook(self._restore_pending)

    @contextmanager
    def use(self, side: str | None) -> Iterator[None]:
        """Within the block the optimizer steps with ``side``'s state (None: its own)."""
        if side is None:
            yield
            return
        optimizer = self.optimizer
        own = optimizer.state
        optimizer.state = self.states.setdefault(side, defaultdict(dict))
        try:
            yield
        finally:
            self.states[side] = optimizer.state
            optimizer.state = own

    # ---------------------------------------------------------- state-dict hooks
    def _param_order(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _add_to_state_dict(self, optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        if not self.states:
            return state_dict
        index = {id(p): i for i, p in enumerate(self._param_order())}
        # keyed by position, as torch packs its own state, so a fresh optimizer can map them back
        state_dict[SIDE_STATES_KEY] = {
            side: {index[id(p)]: value for p, value in state.items() if id(p) in index}
            for side, state in self.states.items()
        }
        return state_dict

    def _take_from_state_dict(self, optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        # torch hands the hooks a shallow copy: popping does not change the caller's dict
        self._pending = state_dict.pop(SIDE_STATES_KEY, None)
        return state_dict

    def _restore_pending(self, optimizer) -> None:
        pending, self._pending = self._pending, None
        self.states = {}
        if not pending:
            return
        params = self._param_order()
        for side, packed in pending.items():
            state: defaultdict = defaultdict(dict)
            for position, value in packed.items():
                p = params[int(position)]
                state[p] = {key: _placed(key, item, p) for key, item in value.items()}
            self.states[side] = state


def side_states_of(optimizer: torch.optim.Optimizer) -> SideStates:
    """The optimizer's :class:`SideStates`, attached on first use.

    Attaching it when the optimizer is built (``build_base_optimizer`` does)
    means its loading hook exists before any checkpoint is loaded into the
    optimizer, whatever order a runner constructs its trainer and resumes in:
    without the hook torch would ignore the side states silently.
    """
    attached = getattr(optimizer, "_sharp_unlearn_side_states", None)
    if attached is None:
        attached = SideStates(optimizer)
        optimizer._sharp_unlearn_side_states = attached
    return attached


def _placed(key: str, value: Any, param: torch.Tensor) -> Any:
    """A loaded state value on the parameter's device (and dtype for float buffers), as torch's
    own loading does; ``step`` counters keep their dtype and device (Adam keeps them on the CPU)."""
    if not isinstance(value, torch.Tensor):
        return value
    if key == "step":
        return value.clone()
    if value.is_floating_point():
        return value.to(device=param.device, dtype=param.dtype)
    return value.to(device=param.device)
