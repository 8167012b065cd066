"""Exact tensor memory of a piece of code, independent of the allocator (how SAM's extra memory is measured).

:class:`TensorBytes` is a ``TorchDispatchMode``: it sees the outputs of every
tensor operation run inside it, the ones autograd's backward runs included, and
counts each new storage once (``nbytes``) until it is freed. ``peak`` is the
most bytes of tensors created inside the mode that were alive at once, sampled
after every operation; tensors that existed before (weights, optimizer state,
the batch) are not counted, nor is what a kernel allocates internally and frees
before it returns. Unlike allocator statistics (CUDA's caching allocator, glibc's
heap) the figure does not depend on caching, fragmentation or the device, so the
same count serves a CPU test and a GPU run.

    with TensorBytes() as counter:
        trainer.step(objectives, batches)
    counter.peak  # bytes
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorBytes(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        # storage id -> (weak reference, bytes): a weak reference, so counting never keeps memory alive
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self._live = 0
        self.peak = 0

    @property
    def live(self) -> int:
        """Bytes of the counted storages still alive now."""
        self._forget_freed()
        return self._live

    def _storage_of(self, t: torch.Tensor) -> torch.UntypedStorage | None:
        if t.layout != torch.strided or t.device.type == "meta":
            return None
        return t.untyped_storage()

    def _forget_freed(self) -> None:
        freed = [key for key, (ref, _) in self._storages.items() if ref.expired()]
        for key in freed:
            self._live -= self._storages.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._forget_freed()
        # an output sharing an input's storage (a view, an in-place op, out=) allocated nothing
        inputs = {s._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                  for s in [self._storage_of(t)] if s is not None}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = self._storage_of(t)
            if storage is None or storage._cdata in inputs or storage._cdata in self._storages:
                continue
            self._storages[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
            self._live += storage.nbytes()
        self.peak = max(self.peak, self._live)
        return out

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now."""
        self.peak = self.live


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the trainable parameters: the unit SAM's extra memory is counted in."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
