"""This rank's slice of every trainable parameter inside a DeepSpeed engine.

SAM needs four things from ZeRO that DeepSpeed has no public API for: the
rank's piece of the reduced gradient, the rank's piece of the weights the
forward pass reads, the fp32 master copy of that piece, and a way to make an
edit of the pieces visible to every rank's forward pass. :class:`ShardView`
gives them per stage, without gathering full tensors:

=====  ===========================  ==========================  =======================================
stage  forward weights (this rank)  reduced gradient            publishing an edit of the weights
=====  ===========================  ==========================  =======================================
0      the full parameter           ``p.grad`` (all-reduced)    nothing: every rank made the same edit
1, 2   ``_hp_mapping`` lp fragment  ``averaged_gradients`` frag all-gather of the flat bit16 groups
3      ``p.ds_tensor`` (partition)  the grad partition buffer   release gathered params (+ persistent)
=====  ===========================  ==========================  =======================================

Facts the SAM step relies on (measured on deepspeed 0.19.8 with torch 2.14, gloo, 2 CPU ranks):
the second backward overwrites the gradient at stages 1/2 but accumulates at
stage 3 unless the ZeRO optimizer's ``zero_grad`` resets its micro-step
counter; ``engine.step()`` rewrites every forward weight from the fp32 master
(stages 1-3), which therefore restores the weights when the master is a
separate copy. In fp32 at stage 3 the master *is* the forward partition
(:func:`share_stage3_fp32_master` makes sure of it), so there the perturbation
is undone before the step instead.

Views are rebuilt by :meth:`ShardView.refresh` every step, because DeepSpeed
re-creates gradient lists and re-links fragments after checkpoint loads.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Shard:
    """One parameter's piece owned by this rank (flat, contiguous views)."""

    name: str
    param: nn.Parameter
    #: forward weights of the piece; editing them changes the forward pass after ``publish()``
    weight: torch.Tensor
    #: fp32 master copy of the piece; None when it is ``weight`` itself or does not exist
    master: torch.Tensor | None
    #: position of the piece in ``param.flatten()``
    offset: int
    numel: int

    def mask_slice(self, mask: torch.Tensor) -> torch.Tensor:
        """The piece of a full-shape {0,1} mask that lines up with this shard."""
        return mask.reshape(-1).narrow(0, self.offset, self.numel)


def _flat_view(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if not tensor.is_contiguous():  # a copy would silently drop our in-place edits
        raise RuntimeError(f"DeepSpeed {what} is not contiguous; the SAM step needs an in-place view")
    return tensor.view(-1)


class ShardView:
    """Access to this rank's partitions of a DeepSpeed engine's trainable parameters."""

    def __init__(self, engine, named_params: Sequence[tuple[str, nn.Parameter]]):
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        self.named_params = list(named_params)
        self.optimizer = engine.optimizer
        self.shards: list[Shard] = []
        if self.stage == 3:
            self.group = self.optimizer.dp_process_group
        elif self.stage in (1, 2):
            self.group = self.optimizer.real_dp_process_group[0]
        else:
            self.group = None  # the default (world) group: stage 0 is plain data parallelism
        self.refresh()

    # ------------------------------------------------------------- layout
    @property
    def replicated(self) -> bool:
        """Stage 0: every rank holds (and edits identically) the whole model."""
        return self.stage == 0

    @property
    def partition_numel(self) -> int:
        return sum(s.numel for s in self.shards)

    @property
    def masters_are_separate(self) -> bool:
        """True when the forward weights can be restored from an untouched fp32 master."""
        return bool(self.shards) and all(s.master is not None for s in self.shards)

    def pieces(self) -> list[tuple[torch.Size, int, int]]:
        """Every trainable parameter in order: its whole shape, and the offset and length of this
        rank's piece of its flat form (length 0: none here); the pieces are ``shards``, in that order."""
        held = {s.name: s for s in self.shards}
        out = []
        for name, p in self.named_params:
            shape = p.ds_shape if self.stage == 3 else p.shape  # ZeRO-3 leaves p itself empty
            piece = held.get(name)
            out.append((torch.Size(shape), piece.offset, piece.numel) if piece is not None
                       else (torch.Size(shape), 0, 0))
        return out

    def refresh(self) -> None:
        if self.stage == 0:
            self.shards = [Shard(n, p, p.data.view(-1), None, 0, p.numel()) for n, p in self.named_params]
        elif self.stage in (1, 2):
            self.shards = [s for s in (self._shard_12(n, p) for n, p in self.named_params) if s is not None]
        else:
            self.shards = [s for s in (self._shard_3(n, p) for n, p in self.named_params) if s is not None]

    def _shard_12(self, name: str, p: nn.Parameter) -> Shard | None:
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return None  # no piece of this parameter lives in this rank's partition
        start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
        weight = _flat_view(p.data, "bit16 parameter").narrow(0, start, numel)
        master = mapping.hp_fragment
        if master is not None and master.data_ptr() == weight.data_ptr():
            master = None
        return Shard(name, p, weight, master, start, numel)

    def _shard_3(self, name: str, p: nn.Parameter) -> Shard | None:
        part = p.ds_tensor.ds_numel
        rank = torch.distributed.get_rank(group=self.group)
        valid = max(0, min(part, p.ds_numel - rank * part))  # the last partitions may be all padding
        if valid == 0:
            return None
        weight = _flat_view(p.ds_tensor.data, "ZeRO-3 partition").narrow(0, 0, valid)
        master, _ = self.optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False)
        master = master.narrow(0, 0, valid)
        if master.data_ptr() == weight.data_ptr():
            master = None  # fp32 at stage 3: DeepSpeed keeps one copy for both
        return Shard(name, p, weight, master, rank * part, valid)

    # ------------------------------------------------------------- gradients
    def grad_views(self) -> list[torch.Tensor]:
        """This rank's reduced (averaged) gradient pieces, as writable views in storage dtype."""
        if self.stage == 0:
            views = []
            for s in self.shards:
                if s.param.grad is None:
                    s.param.grad = torch.zeros_like(s.param)  # unused by the loss: a zero gradient
                views.append(_flat_view(s.param.grad, "gradient"))
            return views
        if self.stage in (1, 2):
            views = []
            for s in self.shards:
                frag = s.param._hp_mapping.get_lp_grad_fragment(s.param._index_in_param_group)
                flat = _flat_view(frag, "gradient partition")
                if flat.numel() != s.numel:  # a full-size buffer: keep only our piece
                    flat = flat.narrow(0, s.offset, s.numel)
                views.append(flat)
            return views
        views = []
        for s in self.shards:
            grad, _ = self.optimizer._get_fp32_grad_state_partition(s.param, release_swap_buffers=False)
            views.append(_flat_view(grad, "ZeRO-3 gradient partition").narrow(0, 0, s.numel))
        return views

    # ------------------------------------------------------------- weights
    @torch.no_grad()
    def publish(self) -> None:
        """Make every rank's forward pass see the edits each rank made to its own pieces."""
        if self.stage == 0:
            return
        if self.stage in (1, 2):
            from deepspeed.runtime.utils import all_gather_dp_groups

            opt = self.optimizer
            all_gather_dp_groups(groups_flat=opt.bit16_groups_flat,
                                 partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
                                 dp_process_group=opt.real_dp_process_group,
                                 start_alignment_factor=opt.nccl_start_alignment_factor,
                                 allgather_bucket_size=opt.allgather_bucket_size)
            return
        # stage 3: drop every gathered copy, so the next forward gathers the edited partitions;
        # persistent (small) parameters stay gathered by design, so gather them again now
        # (the same sequence DeepSpeed's own step uses)
        self.optimizer._partition_all_parameters()
        persistent = list(getattr(self.optimizer, "persistent_parameters", []) or [])
        if persistent:
            persistent[0].all_gather(persistent)

    @torch.no_grad()
    def restore_from_master(self) -> None:
        for s in self.shards:
            if s.master is not None:
                s.weight.copy_(s.master)

    def before_second_backward(self) -> None:
        """Make the next backward overwrite (not add to) the gradient pieces."""
        if self.stage == 0:
            self.engine.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------- collectives
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over the data-parallel group, in place."""
        torch.distributed.all_reduce(tensor, group=self.group)
        return tensor


def share_stage3_fp32_master(engine) -> bool:
    """At ZeRO-3 in fp32, let the fp32 master partition *be* the forward partition (saves 1/N
    of the model per rank); returns whether it now is.

    DeepSpeed means to do this itself ("we don't need another copy of the weights")
    but decides by comparing ``tensor.device`` with a device *string*, which
    torch 2.14 reports as unequal, so it keeps a second fp32 copy. The master
    tensor objects stay (the optimizer's state is keyed by them); only their
    storage is pointed at the forward partition, which holds the same values.
    """
    if int(engine.zero_optimization_stage()) != 3:
        return False
    opt = engine.optimizer
    if opt.offload_optimizer or getattr(opt, "swap_optimizer", False) or getattr(opt, "params_in_nvme_and_cpu", False):
        return False
    forward, masters = opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat
    if len(forward) != len(masters) or any(
            f is None or f.dtype != m.dtype or f.dtype != opt.master_weights_and_grads_dtype
            or f.device != m.device or f.numel() != m.numel() for f, m in zip(forward, masters)):
        return False  # bf16/fp16 weights: the fp32 master is a real second copy
    for f, m in zip(forward, masters):
        if f.data_ptr() != m.data_ptr():
            m.data = f.data
    return True


def gather_full_params(engine, named_params: Sequence[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Full fp32 copies of every parameter on every rank (gathers: for tests and small exports)."""
    from deepspeed.utils import safe_get_full_fp32_param

    stage = int(engine.zero_optimization_stage())
    out = {}
    for name, p in named_params:
        if stage == 0:
            out[name] = p.detach().float().clone()
        else:
            out[name] = safe_get_full_fp32_param(p).detach().float().clone().reshape(p.ds_shape if stage == 3
                                                                                     else p.shape)
    return out
