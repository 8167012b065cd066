"""Cheaper sharpness-aware steps (issue #19): the arithmetic of SAM's variants.

Exact SAM spends two forward-backward passes per step. Two options of
:class:`~sharp_unlearn.optim.sam.SamVariant` trade exactness for cost, for every
objective that gets SAM (pretraining, every unlearning method, both sides of
Sharp MinMax); their defaults are exact SAM, bit for bit:

* ``every = k`` (perturbation reuse, after LookSAM, Liu et al. 2022): a full SAM
  step every ``k`` steps; in between, one pass and the last measured sharpness
  direction ``d = g(w+e) - g`` re-fitted to the current gradient ``g'``.
  Our own form of the idea: at a full step ``d`` is split into its component
  along ``g`` (kept as the coefficient ``c = <g, d> / ||g||^2``) and the rest
  ``v = d - c g`` (kept as a direction, with its size relative to ``||g||``,
  ``r = ||v|| / ||g||``). A reuse step takes
  ``d' = c g' + r ||g'|| v' / ||v'||`` with ``v'`` the part of ``v`` orthogonal
  to ``g'``, and updates with ``g' + s*lamb*d'`` as SAM would with ``d``. At the
  step where ``d`` was measured ``d' = d``. LookSAM keeps only the orthogonal
  part, scaled by a fixed hyper-parameter instead of the measured ``c`` and
  ``r``. Costs one model-sized buffer (``v``) per SAM objective.
* ``fraction < 1`` (SAM on a subset of the entries, after ESAM's stochastic
  weight perturbation, Du et al. 2022, and sparse SAM, Mi et al. 2022): the
  perturbation ``e`` is built from, and lives on, a subset of the entries:
  ``subset = "random"`` draws each entry with probability ``fraction``, again at
  every step, from the trainer's seeded generator; ``"saliency"`` takes the
  ``fraction`` of the candidate entries with the largest ``|g|``. Candidates are
  every entry, or the objective's mask when its perturbation is masked. The
  update is SAM's combination with ``g(w+e)`` on every entry.

What a dense autograd pass costs does not shrink with a sparse ``e``: the subset
variant changes the perturbation, not the work (benchmarks/sam_variants.py).

Every function also serves a sharded caller (the DeepSpeed engine, each rank holding
flat pieces of the parameters): ``reduce`` sums per-rank partial scalars across ranks,
so norms, dot products, candidate counts and the saliency threshold are global, and
``pieces`` tells :func:`random_subset` where this rank's pieces sit in the whole
parameters, so every rank draws exactly the single-process subset.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sharp_unlearn.optim.sam import SIGNS, SamSpec, SamVariant, combine, squared_norm

#: sums per-rank partial scalars across ranks (a sharded caller); None: one process holds everything
Reduce = Callable[[list[torch.Tensor]], list[float]]


def _sums(values: list[torch.Tensor], reduce: Reduce | None) -> list[float]:
    return [float(v) for v in values] if reduce is None else reduce(values)


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    if not a:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([torch.vdot(x.flatten().double(), y.flatten().double()).cpu() for x, y in zip(a, b)]).sum()


# --------------------------------------------------------------- reuse (every k steps)
@dataclass
class SharpnessDirection:
    """``d = g(w+e) - g`` as a reuse step needs it: ``c`` along ``g``, the rest ``v`` and its size ``r``."""

    along: float
    ratio: float
    across: list[torch.Tensor]


@torch.no_grad()
def measure_direction(grads: Sequence[torch.Tensor], direction: Sequence[torch.Tensor],
                      reduce: Reduce | None = None) -> SharpnessDirection:
    """Split ``direction`` (``d``) against ``grads`` (``g``): ``c = <g,d>/||g||^2``, ``v = d - c g``,
    ``r = ||v||/||g||`` (``c = r = 0`` when ``g`` is zero)."""
    gg, gd = _sums([squared_norm(grads).double().cpu(), _dot(grads, direction)], reduce)
    along = gd / gg if gg > 0 else 0.0
    across = torch._foreach_add(list(direction), list(grads), alpha=-along) if grads else []
    (vv,) = _sums([squared_norm(across).double().cpu()], reduce)
    ratio = (vv ** 0.5) / (gg ** 0.5) if gg > 0 else 0.0
    return SharpnessDirection(along, ratio, across)


@torch.no_grad()
def reused_direction(memory: SharpnessDirection, grads: Sequence[torch.Tensor],
                     reduce: Reduce | None = None) -> list[torch.Tensor]:
    """``d' = c g' + r ||g'|| v'/||v'||``, ``v' = v - (<v,g'>/||g'||^2) g'`` (new tensors)."""
    if not grads and reduce is None:
        return []  # a sharded rank holding no piece still joins the collectives below
    gg, vg = _sums([squared_norm(grads).double().cpu(), _dot(memory.across, grads)], reduce)
    if gg <= 0:
        return [torch.zeros_like(g) for g in grads]
    across = torch._foreach_add(memory.across, list(grads), alpha=-vg / gg)
    (vv,) = _sums([squared_norm(across).double().cpu()], reduce)
    result = torch._foreach_mul(list(grads), memory.along)
    if vv > 0 and memory.ratio > 0:
        torch._foreach_add_(result, across, alpha=memory.ratio * (gg ** 0.5) / (vv ** 0.5))
    return result


# --------------------------------------------------------------- subset of the entries
#: where a rank's flat piece of one parameter sits: (the whole parameter's shape, offset, numel)
Piece = tuple[torch.Size, int, int]


@torch.no_grad()
def random_subset(grads: Sequence[torch.Tensor], fraction: float, generator: torch.Generator,
                  within: Sequence[torch.Tensor] | None = None,
                  pieces: Sequence[Piece] | None = None) -> list[torch.Tensor]:
    """0/1 tensors: each entry drawn with probability ``fraction`` (CPU draws, in order, so one
    generator gives the same subset on any device), times ``within`` when given.

    ``pieces`` (a sharded caller): one entry per parameter of the whole model, in the
    single-process order, ``numel`` 0 for a parameter of which this rank holds nothing;
    ``grads`` are the held pieces, in that order. Every parameter is drawn whole and the
    rank keeps its slice: one full-size random draw per step on every rank (a parameter
    at a time), the price of drawing exactly the single-process subset, since the CPU
    generator cannot skip the entries other ranks hold.
    """
    if pieces is None:
        pieces = [(g.shape, 0, g.numel()) for g in grads]
    held = iter(grads)
    picked = []
    for shape, offset, numel in pieces:
        drawn = torch.rand(shape, generator=generator) < fraction
        if numel == 0:
            continue
        g = next(held)
        picked.append(drawn.reshape(-1).narrow(0, offset, numel).reshape(g.shape).to(g.device, g.dtype))
    if within is not None:
        torch._foreach_mul_(picked, list(within))
    return picked


@torch.no_grad()
def kth_largest(scores: Sequence[torch.Tensor], k: int, reduce: Reduce | None = None) -> torch.Tensor:
    """The ``k``-th largest entry (a float32 0-d CPU tensor) of non-negative ``scores``, all
    tensors together (and all ranks' with ``reduce``); ``k`` counts from 1 and is at most
    the number of entries.

    A radix select on the float32 bit patterns, which order non-negative floats as their
    values: four rounds, each counting the entries that share the bits fixed so far in
    256 bins of the next 8 bits, then fixing the bin that holds the ``k``-th largest. A
    round's counts are summed over ranks in one collective of 256 numbers, so a sharded
    caller finds the global threshold without gathering any scores; and the result is the
    value ``torch.kthvalue`` would pick from all of them, whichever way they are split.
    """
    prefix, remaining = 0, k
    for shift in (24, 16, 8, 0):
        counts = torch.zeros(256, dtype=torch.int64)
        for score in scores:
            bits = score.detach().float().reshape(-1).view(torch.int32)  # a view: no copy of float32 scores
            if shift < 24:  # only the entries whose higher bits are the prefix fixed so far
                bits = bits[(bits >> (shift + 8)) == (prefix >> (shift + 8))]
            counts += torch.bincount((bits >> shift) & 255, minlength=256).cpu()
        totals = counts.tolist() if reduce is None else [round(c) for c in reduce(list(counts.double()))]
        if shift == 24 and not 1 <= k <= sum(totals):  # the search below would run off the bins
            raise ValueError(f"k={k} is not between 1 and the {sum(totals)} entries of the scores")
        digit, above = 255, 0
        while above + totals[digit] < remaining:  # from the largest bin down
            above += totals[digit]
            digit -= 1
        remaining -= above
        prefix |= digit << shift
    return torch.tensor([prefix], dtype=torch.int32).view(torch.float32)[0]


@torch.no_grad()
def salient_subset(grads: Sequence[torch.Tensor], fraction: float,
                   within: Sequence[torch.Tensor] | None = None,
                   reduce: Reduce | None = None) -> list[torch.Tensor]:
    """0/1 tensors marking the ``fraction`` of the candidates (every entry, or those of ``within``)
    with the largest ``|g|``; ties at the threshold are all kept."""
    scores = [g.abs() for g in grads]
    if within is not None:
        scores = torch._foreach_mul(scores, list(within))
    held = sum(int(m.count_nonzero()) for m in within) if within is not None else sum(g.numel() for g in grads)
    (candidates,) = _sums([torch.tensor(float(held), dtype=torch.float64)], reduce)
    keep = max(1, round(fraction * candidates))
    threshold = kth_largest(scores, keep, reduce)
    picked = [(s >= threshold.to(s.device)).to(g.dtype) for s, g in zip(scores, grads)]
    if within is not None:  # a zero threshold would also take entries outside the candidates
        torch._foreach_mul_(picked, list(within))
    return picked


def perturbed_subset(variant: SamVariant, grads: Sequence[torch.Tensor], generator: torch.Generator,
                     within: Sequence[torch.Tensor] | None = None, reduce: Reduce | None = None,
                     pieces: Sequence[Piece] | None = None) -> list[torch.Tensor] | None:
    """The 0/1 tensors of the entries SAM perturbs at this step, or None for every entry (exact SAM);
    ``reduce`` and ``pieces`` as :func:`salient_subset` and :func:`random_subset` take them."""
    if variant.fraction >= 1.0:
        return None
    if variant.subset == "random":
        return random_subset(grads, variant.fraction, generator, within, pieces)
    return salient_subset(grads, variant.fraction, within, reduce)


# --------------------------------------------------------------- per-trainer state
class VariantState:
    """What SAM's variants remember between steps, per objective name: the last measured
    sharpness direction and how many steps ago it was measured; and the generator random
    subsets are drawn from.

    ``restart(seed)`` (the driver calls it at every epoch's start) forgets the directions and
    reseeds the generator, so the first step of an epoch is a full SAM step and an epoch's
    draws do not depend on earlier epochs: a run resumed from an epoch checkpoint takes the
    same steps as one that was never interrupted.
    """

    def __init__(self, seed: int = 0):
        self.restart(seed)

    def restart(self, seed: int) -> None:
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self._memory: dict[str, tuple[SharpnessDirection, int]] = {}

    def reuse_due(self, name: str, every: int) -> bool:
        """True when objective ``name`` may reuse its direction at this step (and counts the step)."""
        entry = self._memory.get(name)
        if entry is None or entry[1] + 1 >= every:
            return False
        self._memory[name] = (entry[0], entry[1] + 1)
        return True

    def remember(self, name: str, direction: SharpnessDirection) -> None:
        self._memory[name] = (direction, 0)

    def direction(self, name: str) -> SharpnessDirection:
        return self._memory[name][0]

    # the steps of a variant SAM objective, shared by the single-process and the sharded loop
    # (each does its own perturbing, second pass and restoring in between)
    @torch.no_grad()
    def reuse_gradient(self, name: str, spec: SamSpec, grads: Sequence[torch.Tensor],
                       reduce: Reduce | None = None) -> list[torch.Tensor] | None:
        """A reuse step's update gradient ``g + s*lamb*d'`` when objective ``name`` is due one
        (the step is counted), else None: a full step."""
        if spec.variant.every <= 1 or not self.reuse_due(name, spec.variant.every):
            return None
        direction = reused_direction(self.direction(name), grads, reduce)
        return torch._foreach_add(list(grads), direction, alpha=SIGNS[spec.sign] * spec.lamb)

    @torch.no_grad()
    def subset_probe(self, variant: SamVariant, grads: Sequence[torch.Tensor],
                     within: Sequence[torch.Tensor] | None = None, reduce: Reduce | None = None,
                     pieces: Sequence[Piece] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """What a full step's ``e`` is built from: ``g`` inside ``within`` (the objective's mask when
        its perturbation is masked) and on this step's subset; and that subset (None: every entry)."""
        probe = torch._foreach_mul(list(grads), list(within)) if within is not None else list(grads)
        subset = perturbed_subset(variant, probe, self.generator, within, reduce, pieces)
        if subset is not None:
            probe = torch._foreach_mul(probe, subset)
        return probe, subset

    @torch.no_grad()
    def full_step_gradient(self, name: str, spec: SamSpec, grads: Sequence[torch.Tensor],
                           second: Sequence[torch.Tensor], reduce: Reduce | None = None) -> list[torch.Tensor]:
        """A full step's update gradient (SAM's combination of ``g`` and ``g(w+e)``), remembering
        the direction ``d = g(w+e) - g`` for the reuse steps that follow when ``every > 1``."""
        if spec.variant.every > 1:
            self.remember(name, measure_direction(grads, torch._foreach_sub(list(second), list(grads)), reduce))
        return combine(grads, second, spec.sign, spec.lamb)
