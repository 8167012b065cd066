"""The training loop inside a DeepSpeed engine (ZeRO stage 0-3), SAM included.

The same :class:`~sharp_unlearn.engine.objective.Objective` phases that
:class:`~sharp_unlearn.engine.loop.Trainer` runs on one device run here on N
ranks. A step, for objectives ``O_1..O_k``::

    for each step group (objectives sharing ``step_group``; one group by default):
        for each objective O of the group (each rank holds 1/N of every global batch):
            engine.backward over O's micro-batches -> this rank's piece of g (reduced)
            if O.sam:
                s2 = all_reduce(sum over this rank's pieces of |T g_M|^2)   (global norm;
                     g itself instead of g_M when O.perturbation == "full")
                e  = rho * T^2 g_M / sqrt(s2), piece by piece; w_piece += e; publish
                engine.backward at w+e (BatchNorm statistics frozen) -> piece of g2
                g  = g + s*lamb*(g2 - g)   piece by piece (mask_scope "perturbed": M*g2); restore w
            g *= O.mask (the mask's piece; not for mask_scope "perturbed")
        pieces = sum over the group; engine.step() with the group's own base-optimizer state
        (the lr schedule advances only at the last group's step)

Per-rank memory beyond DeepSpeed's own: at most one partition-sized fp32
buffer per SAM objective (``g`` when ``lamb*s != 1``, else ``e`` when the
weights cannot be restored from an fp32 master), one more partition-sized
accumulator only for phases with several objectives, and transient
temporaries bounded by ``chunk_numel`` elements. Nothing full-size is
gathered. For SGD the update equals ``w - lr*(g + s*lamb*(g2 - g))`` on the
full batch, exactly as the single-process loop computes it.

SAM's cheaper variants (``SamSpec.variant``: direction reuse every k steps, a
perturbation on a random or salient subset) take ``_variant_sam_objective``:
the single-process step through the same
:class:`~sharp_unlearn.optim.sam_variants.VariantState` (which the epoch driver
restarts every epoch, as for one process), with norms, dot products and the
saliency threshold summed over the ranks' pieces. It is out of place, as the
single-process variant step is: ``g``, ``e`` and a remembered direction are
partition-sized fp32 buffers.

Each rank's loss on its slice is weighted by ``n_rank * N / n_global`` so
DeepSpeed's gradient average equals the gradient of the full-batch mean even
when the last batch does not split evenly; ``n`` counts what the loss averages
over (``Objective.mean_over``): rows, or scored labels, which for a causal LM's
``(batch, tokens)`` answer-only labels are the answer tokens.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta

import torch

from sharp_unlearn.config import ExperimentConfig
from sharp_unlearn.engine.deepspeed_shards import Shard, ShardView, share_stage3_fp32_master
from sharp_unlearn.engine.loop import StepStats, Trainer
from sharp_unlearn.engine.objective import Batch, Objective, step_groups
from sharp_unlearn.errors import ConfigError, TrainingDiverged, require
from sharp_unlearn.losses import scored_per_row
from sharp_unlearn.optim.sam import SIGNS, combine, frozen_bn_stats, perturbation, scaled_grads, squared_norm
from sharp_unlearn.optim.side_states import SideStates, side_states_of

#: largest temporary (elements) the SAM arithmetic allocates at once
DEFAULT_CHUNK_NUMEL = 1 << 22


# ---------------------------------------------------------------- process group
def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def quiet_deepspeed_deprecations() -> None:
    """DeepSpeed calls collectives torch 2.14 renamed, and torch warns on *every* call
    (thousands of lines per run, enough to fill a pipe and stall a worker whose
    output nobody reads yet): silence exactly those."""
    import warnings

    renamed = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
    warnings.filterwarnings("ignore", category=FutureWarning, message=renamed)


def init_distributed(cfg: ExperimentConfig) -> torch.device:
    """Join (or reuse) the process group with ``distributed.timeout_s``; returns this rank's device."""
    deepspeed = require("deepspeed", "deepspeed")
    quiet_deepspeed_deprecations()
    rank, world, local_rank = dist_env()
    if world != cfg.distributed.num_workers:
        raise ConfigError(f"this worker was launched with WORLD_SIZE={world}, but distributed.num_workers="
                          f"{cfg.distributed.num_workers}; launch {cfg.distributed.num_workers} processes "
                          "or change num_workers")
    if cfg.distributed.use_gpu:
        if not torch.cuda.is_available():
            raise ConfigError("distributed.use_gpu=true, but this worker sees no CUDA device")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # a dead peer turns every collective into an error after timeout_s instead of a hang
    deepspeed.init_distributed(dist_backend="nccl" if cfg.distributed.use_gpu else "gloo",
                               timeout=timedelta(seconds=cfg.distributed.timeout_s), verbose=False)
    return device


def apply_group_timeout(seconds: float) -> int:
    """Give every process group this rank belongs to the run's collective timeout; returns how many.

    ``init_process_group(timeout=...)`` only covers the world group; DeepSpeed
    creates its data-parallel groups with ``new_group()``, which takes torch's
    default (30 minutes for gloo), so a frozen peer would hang a ZeRO
    reduction that long. Call after ``deepspeed.initialize`` (which creates them).
    """
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=seconds)
    count = 0
    for group in list(c10d._world.pg_map):
        if group is None or c10d._rank_not_in_group(group):
            continue
        if hasattr(torch.distributed, "set_timeout"):
            torch.distributed.set_timeout(timeout, group)
        else:  # pragma: no cover - torch < 2.6
            c10d._set_pg_timeout(timeout, group)
        count += 1
    return count


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------- the model seen by losses
class EngineModel:
    """What an objective's loss receives as ``model``: ``model(x)`` runs ``engine.forward``
    (DeepSpeed hooks its backward bookkeeping onto that output); other attributes
    (``features``, ``head``, ``parameters``...) are the wrapped module's.

    Calling a submodule directly (``model.features(x)``) works at every stage
    (ZeRO-3 gathers a submodule's parameters in its own forward hooks), except
    for parameters registered on the top-level module itself at stage 3, which
    only its own forward gathers: losses should prefer ``model(x)``.
    """

    def __init__(self, engine):
        self.__dict__["_engine"] = engine
        self.__dict__["forwarded"] = False

    def __call__(self, *args, **kwargs):
        self.__dict__["forwarded"] = True
        return self._engine(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._engine.module, name)


def split_rows(total: int, world: int, rank: int) -> tuple[int, int]:
    """Start and length of this rank's rows of a ``total``-row batch (sizes differ by at most 1)."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


# ---------------------------------------------------------------- trainer
class DeepSpeedTrainer(Trainer):
    """:class:`Trainer` whose step runs in a DeepSpeed engine.

    Batches handed to :meth:`step` (and produced by the stream factories given
    to :meth:`run_phase`) are *global* batches; each rank takes its slice.
    ``probe(point)`` (benchmarks) is called at ``"after_backward"`` and
    ``"sam_perturbed"``.
    """

    def __init__(self, engine, *, device: torch.device | str = "cpu", grad_accum: int = 1,
                 chunk_numel: int = DEFAULT_CHUNK_NUMEL, probe: Callable[[str], None] | None = None):
        super().__init__(engine.module, engine.optimizer, None, device=device, grad_accum=grad_accum,
                         grad_clip=0.0)  # DeepSpeed clips (gradient_clipping) inside engine.step
        self.engine = engine
        self.proxy = EngineModel(engine)
        share_stage3_fp32_master(engine)  # fp32 ZeRO-3: one copy of the partition, not two
        self.view = ShardView(engine, self.named_params)
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.chunk_numel = max(1, int(chunk_numel))
        self.input_dtype = torch.bfloat16 if engine.bfloat16_enabled() else (
            torch.float16 if engine.fp16_enabled() else None)
        self.probe = probe
        self._mask_slices_cache: dict[int, tuple[dict, tuple, list[torch.Tensor]]] = {}

    def _make_side_states(self) -> SideStates:
        # the torch optimizer that DeepSpeed's wrappers step over this rank's (flat fp32) partitions:
        # its state is what a sequential side swaps, and its state_dict is what DeepSpeed checkpoints
        base = self.optimizer
        while not isinstance(base, torch.optim.Optimizer) and hasattr(base, "optimizer"):
            base = base.optimizer
        if not isinstance(base, torch.optim.Optimizer):  # pragma: no cover - a DeepSpeed layout we do not know
            raise ConfigError(f"cannot find the torch optimizer inside {type(self.optimizer).__name__}; "
                              "sequential updates (method.update_order=sequential) need one")
        return side_states_of(base)

    # ------------------------------------------------------------ data
    def _local(self, batch: Batch, mean_over: str = "labels") -> tuple[Batch, float]:
        """This rank's rows of a global batch and the loss weight that makes the
        rank-average of gradients the full-batch gradient: the rank's share of what
        the loss averages over (``Objective.mean_over``), times N. Sequence batches
        (answer-only labels) weigh a rank by its scored tokens, since its rows' answers
        differ in length; a classifier's rows are one scored label each."""
        total = len(batch.y)
        start, count = split_rows(total, self.world, self.rank)
        if mean_over == "examples":
            weight = count * self.world / total
        else:
            units = scored_per_row(batch.y)
            weight = int(units[start:start + count].sum()) * self.world / int(units.sum())
        if count == 0:  # fewer rows than ranks: still take part in the collectives, with weight 0
            start, count, weight = 0, 1, 0.0
        x = batch.x[start:start + count]
        if self.input_dtype is not None and x.is_floating_point():
            x = x.to(self.input_dtype)  # bf16 weights need bf16 inputs (DeepSpeed does not cast them)
        return Batch(x, batch.y[start:start + count], batch.index[start:start + count]), weight

    # ------------------------------------------------------------ passes
    def _backward(self, objective: Objective, micro: Sequence[tuple[Batch, float]]) -> torch.Tensor:
        """engine.backward over the micro-batches (reduction at the last one); returns the
        rank's weighted loss (its all-reduced sum / N is the full-batch loss)."""
        engine = self.engine
        total = torch.zeros((), dtype=torch.float64)
        for i, (batch, weight) in enumerate(micro):
            engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
            self.proxy.__dict__["forwarded"] = False
            loss = objective.loss(self.proxy, batch) * (weight / len(micro))
            if not self.proxy.forwarded:
                # the loss never went through engine.forward, which is where DeepSpeed
                # registers its backward prologue: register it on the loss instead
                from deepspeed.runtime.utils import register_output_backward_hooks

                register_output_backward_hooks(loss, preprocess_once_fn=engine._backward_prologue,
                                               preprocess_per_tensor_fn=engine._backward_prologue_per_tensor)
            engine.backward(loss, scale_wrt_gas=False)
            total += loss.detach().double().cpu()
        return total

    def _check_finite(self, objective: Objective, loss_mean: float, where: str) -> None:
        # every rank holds the same all-reduced value, so all ranks raise together (no hang)
        if not math.isfinite(loss_mean):
            raise TrainingDiverged(
                f"objective {objective.name!r} produced a non-finite loss ({loss_mean}) {where}; "
                "lower the learning rate (or rho); nothing was written"
            )

    def _reduce(self, values: list[torch.Tensor], group=None) -> list[float]:
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        packed = torch.stack([v.to(device=device, dtype=torch.float64) for v in values])
        torch.distributed.all_reduce(packed, group=group)
        return [float(v) for v in packed.cpu()]

    def _chunks(self) -> list[list[int]]:
        chunks, current, size = [], [], 0
        for i, s in enumerate(self.view.shards):
            if current and size + s.numel > self.chunk_numel:
                chunks.append(current)
                current, size = [], 0
            current.append(i)
            size += s.numel
        if current:
            chunks.append(current)
        return chunks

    def _mask_slices(self, objective: Objective) -> list[torch.Tensor] | None:
        """The objective's mask cut to this rank's pieces (fp32 copies: partition-sized)."""
        mask = objective.mask
        if mask is None:
            return None
        layout = tuple((s.name, s.offset, s.numel) for s in self.view.shards)
        cached = self._mask_slices_cache.get(id(mask))
        if cached is not None and cached[0] is mask and cached[1] == layout:
            return cached[2]
        slices = []
        for s in self.view.shards:
            full = mask.get(s.name)
            if full is None:
                slices.append(torch.ones(s.numel, device=s.weight.device, dtype=torch.float32))
            else:
                slices.append(s.mask_slice(full).to(s.weight.device, torch.float32).clone())
        if len(self._mask_slices_cache) >= 8:  # masks of finished phases
            self._mask_slices_cache.clear()
        # the cache keeps the mask object alive, so its id cannot be reused by another dict
        self._mask_slices_cache[id(mask)] = (mask, layout, slices)
        return slices

    # ------------------------------------------------------------ SAM
    @staticmethod
    def _probes(sources: Sequence[torch.Tensor], idx: Sequence[int],
                masks: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """``g_M`` (the gradient inside the mask) for one chunk of pieces, in fp32."""
        if masks is None:
            return [sources[i].float() for i in idx]
        return [sources[i].float() * masks[i] for i in idx]

    @torch.no_grad()
    def _perturb(self, idx: Sequence[int], probes: list[torch.Tensor], masks: list[torch.Tensor] | None,
                 spec, sq: torch.Tensor, sign: float = 1.0, e_stash: torch.Tensor | None = None,
                 offsets: Sequence[int] = ()) -> None:
        """``w += sign * e`` on one chunk of pieces, ``e`` from the shared SAM helper."""
        shards = self.view.shards
        weights = [shards[i].weight for i in idx]
        e = perturbation([w.float() for w in weights], probes, spec.rho, spec.adaptive, global_sq_norm=sq)
        if masks is not None:  # ASAM's |w| scaling keeps the subspace, but be exact
            torch._foreach_mul_(e, [masks[i] for i in idx])
        for j, i in enumerate(idx):
            if e_stash is not None:
                e_stash.narrow(0, offsets[i], shards[i].numel).copy_(e[j])
            weights[j].add_(e[j].to(weights[j].dtype), alpha=sign)

    def _perturbed_backward(self, objective: Objective, micro) -> None:
        """The second pass of every SAM step (exact or a variant): publish the perturbed shards,
        backward at w+e with BatchNorm statistics frozen, and refuse a non-finite loss there."""
        view = self.view
        view.publish()
        if self.probe is not None:
            self.probe("sam_perturbed")
        view.before_second_backward()
        with frozen_bn_stats(self.engine.module):
            loss = self._backward(objective, micro)
        (loss_sum,) = self._reduce([loss])
        self._check_finite(objective, loss_sum / self.world, "at the perturbed weights w+e")

    def _sam_objective(self, objective: Objective, micro, masks: list[torch.Tensor] | None,
                       loss1: torch.Tensor, last: bool) -> tuple[float, bool]:
        """Perturb, second pass, combine, restore, for one objective, in place on the grad pieces.

        Returns the full-batch loss and whether the weights still hold ``w+e`` for
        ``engine.step()`` to overwrite from the fp32 masters (last objective only).
        """
        spec = objective.sam
        view = self.view
        shards = view.shards
        offsets, pos = _offsets(shards)
        device = shards[0].weight.device if shards else self.device
        chunks = self._chunks()
        keep_first = SIGNS[spec.sign] * spec.lamb != 1.0  # lamb=1, min: the update gradient is g2 itself
        # the perturbation's subspace: the mask's, or every entry (perturbation "full")
        e_masks = masks if objective.perturbation == "masked" else None
        # mask_scope "perturbed": only g2 is masked here; the caller leaves the combination unmasked
        g2_masks = masks if objective.mask_scope == "perturbed" else None

        grads = view.grad_views()  # g (pass 1), this rank's pieces
        sq_local = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for idx in chunks:
                tg = scaled_grads([shards[i].weight.float() for i in idx], self._probes(grads, idx, e_masks),
                                  spec.adaptive)
                sq_local += squared_norm(tg).double().cpu()
        if view.replicated:  # stage 0: every rank already holds the whole gradient
            (loss_sum,) = self._reduce([loss1])
            sq_total = float(sq_local)
        else:  # the norm over every rank's pieces and the pass-1 loss in one collective
            loss_sum, sq_total = self._reduce([loss1, sq_local], group=view.group)
        loss_mean = loss_sum / self.world
        self._check_finite(objective, loss_mean, "before the SAM perturbation")
        sq = torch.tensor(sq_total, dtype=torch.float32, device=device)

        first = None
        if keep_first:
            first = torch.empty(pos, dtype=torch.float32, device=device)
            for i, g in enumerate(grads):
                first.narrow(0, offsets[i], shards[i].numel).copy_(g)
        # how the weights come back: from the untouched fp32 master (no buffer), by
        # recomputing e from the stashed g (SAM: e is a scalar times g_M), or from a stashed e
        if view.masters_are_separate:
            restore = "master"
        elif keep_first and not spec.adaptive:
            restore = "recompute"
        else:
            restore = "stash"
        e_stash = torch.empty(pos, dtype=torch.float32, device=device) if restore == "stash" else None

        for idx in chunks:
            self._perturb(idx, self._probes(grads, idx, e_masks), e_masks, spec, sq, e_stash=e_stash,
                          offsets=offsets)
        del grads
        self._perturbed_backward(objective, micro)

        with torch.no_grad():
            if g2_masks is not None:
                for g, m in zip(view.grad_views(), g2_masks):
                    g.mul_(m.to(g.dtype))
            if keep_first:
                second = view.grad_views()
                for idx in chunks:
                    final = combine([first.narrow(0, offsets[i], shards[i].numel) for i in idx],
                                    [second[i].float() for i in idx], spec.sign, spec.lamb)
                    for j, i in enumerate(idx):
                        second[i].copy_(final[j])
            if restore == "master":
                if last:
                    return loss_mean, True  # engine.step() rewrites every forward weight from the masters
                view.restore_from_master()
            elif restore == "recompute":
                firsts = [first.narrow(0, offsets[i], s.numel) for i, s in enumerate(shards)]
                for idx in chunks:
                    self._perturb(idx, self._probes(firsts, idx, e_masks), e_masks, spec, sq, sign=-1.0)
            else:
                for i, s in enumerate(shards):
                    s.weight.sub_(e_stash.narrow(0, offsets[i], s.numel).to(s.weight.dtype))
        if not last:
            view.publish()  # the next objective's forward needs w on every rank
        # (last objective: engine.step() starts from the restored pieces and re-publishes)
        return loss_mean, False

    def _variant_sam_objective(self, objective: Objective, micro, masks: list[torch.Tensor] | None,
                               loss1: torch.Tensor, last: bool) -> tuple[float, bool]:
        """SAM with a cheaper variant (``spec.variant``) on this rank's pieces: the single-process
        ``Trainer._variant_sam_gradient`` step for step, through the same
        :class:`~sharp_unlearn.optim.sam_variants.VariantState` methods, with every norm, dot
        product, candidate count and saliency threshold summed over the ranks' pieces, and random
        subsets drawn whole and cut to the pieces (the single-process draw).

        Out of place, as there: ``g``, ``e`` (and the remembered direction) are partition-sized
        fp32 buffers, not chunked. Returns as :meth:`_sam_objective`.
        """
        spec = objective.sam
        view = self.view
        shards = view.shards
        memory = self.sam_variants
        # stage 0: every rank holds the whole gradient, so its partial sums are already the totals
        partial = None if view.replicated else (lambda values: self._reduce(values, group=view.group))
        (loss_sum,) = self._reduce([loss1])
        loss_mean = loss_sum / self.world
        self._check_finite(objective, loss_mean, "before the SAM perturbation")
        # g (pass 1) in a buffer of its own: the second backward overwrites the gradient pieces
        grads = [g.to(torch.float32, copy=True) for g in view.grad_views()]
        with torch.no_grad():
            combined = memory.reuse_gradient(objective.name, spec, grads, partial)
            if combined is not None:  # one pass: the weights never moved
                for g, c in zip(view.grad_views(), combined):
                    g.copy_(c)
                return loss_mean, False
            e_masks = masks if objective.perturbation == "masked" else None
            probe, subset = memory.subset_probe(spec.variant, grads, e_masks, partial, view.pieces())
            weights = [s.weight.float() for s in shards]
            sq_local = squared_norm(scaled_grads(weights, probe, spec.adaptive)).double().cpu()
            (sq_total,) = [float(sq_local)] if partial is None else partial([sq_local])
            device = shards[0].weight.device if shards else self.device
            e = perturbation(weights, probe, spec.rho, spec.adaptive,
                             global_sq_norm=torch.tensor(sq_total, dtype=torch.float32, device=device))
            del probe, weights
            for keep in (e_masks, subset):  # ASAM's |w| scaling keeps the subspace, but be exact
                if keep is not None:
                    torch._foreach_mul_(e, keep)
            for s, piece in zip(shards, e):
                s.weight.add_(piece.to(s.weight.dtype))
        self._perturbed_backward(objective, micro)

        with torch.no_grad():
            second = [g.float() for g in view.grad_views()]
            if objective.mask_scope == "perturbed" and masks is not None:  # only g(w+e) is masked
                torch._foreach_mul_(second, masks)
            combined = memory.full_step_gradient(objective.name, spec, grads, second, partial)
            for g, c in zip(view.grad_views(), combined):
                g.copy_(c)
            if view.masters_are_separate:
                if last:
                    return loss_mean, True  # engine.step() rewrites every forward weight from the masters
                view.restore_from_master()
            else:
                for s, piece in zip(shards, e):
                    s.weight.sub_(piece.to(s.weight.dtype))
        if not last:
            view.publish()  # the next objective's forward needs w on every rank
        return loss_mean, False

    # ------------------------------------------------------------ step
    def step(self, objectives: Sequence[Objective], batches: Mapping[str, Sequence[Batch]]) -> StepStats:
        engine = self.engine
        self.model.train()
        stats = StepStats()
        groups = step_groups(objectives)
        scheduler = engine.lr_scheduler
        for position, group in enumerate(groups):
            last_group = position == len(groups) - 1
            try:
                if not last_group:
                    engine.lr_scheduler = None  # the schedule advances once per engine step, not per side
                with self.side_states.use(None if position == 0 else str(group[0].step_group)):
                    self._step_group(group, batches, stats)
            finally:
                engine.lr_scheduler = scheduler
        return stats

    def _step_group(self, objectives: Sequence[Objective], batches: Mapping[str, Sequence[Batch]],
                    stats: StepStats) -> None:
        """One base-optimizer step for objectives summed together (the whole step by default)."""
        engine = self.engine
        view = self.view
        view.refresh()
        accumulator: torch.Tensor | None = None
        offsets, pos = _offsets(view.shards)
        awaiting_restore = False
        for k, objective in enumerate(objectives):
            last = k == len(objectives) - 1
            micro = [self._local(b, objective.mean_over) for b in batches[objective.stream]]
            if k > 0:
                view.before_second_backward()
            loss1 = self._backward(objective, micro)
            if self.probe is not None and k == 0:
                self.probe("after_backward")
            masks = self._mask_slices(objective)
            spec = objective.sam
            if spec is not None and spec.rho > 0 and not spec.variant.exact:
                loss_mean, awaiting_restore = self._variant_sam_objective(objective, micro, masks, loss1, last)
            elif spec is not None and spec.rho > 0:
                loss_mean, awaiting_restore = self._sam_objective(objective, micro, masks, loss1, last)
            else:
                (loss_sum,) = self._reduce([loss1])
                loss_mean = loss_sum / self.world
                self._check_finite(objective, loss_mean, "")
            stats.losses[objective.name] = loss_mean
            if spec is not None and spec.rho > 0 and objective.mask_scope == "perturbed":
                masks = None  # only g(w+e) was masked, inside _sam_objective
            if masks is not None or len(objectives) > 1:
                with torch.no_grad():
                    grads = view.grad_views()
                    if masks is not None:
                        for g, m in zip(grads, masks):
                            g.mul_(m.to(g.dtype))
                    if len(objectives) > 1:
                        if accumulator is None:
                            accumulator = torch.zeros(pos, dtype=torch.float32,
                                                      device=view.shards[0].weight.device if view.shards else "cpu")
                        for i, g in enumerate(grads):
                            accumulator.narrow(0, offsets[i], g.numel()).add_(g.float())
        if accumulator is not None:
            with torch.no_grad():
                for i, g in enumerate(view.grad_views()):
                    g.copy_(accumulator.narrow(0, offsets[i], g.numel()))
            del accumulator
        engine.step()
        if awaiting_restore and not engine.was_step_applied():
            view.restore_from_master()  # a skipped step did not rewrite the weights
            view.publish()
        norm = engine.get_global_grad_norm()
        stats.grad_norm = float(norm) if norm is not None else 0.0


def _offsets(shards: Sequence[Shard]) -> tuple[list[int], int]:
    """Start of each piece in a partition-sized flat buffer, and the buffer's length."""
    offsets, pos = [], 0
    for s in shards:
        offsets.append(pos)
        pos += s.numel
    return offsets, pos
