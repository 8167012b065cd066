"""RUM (Zhao et al. 2024, "What makes unlearning hard and what to do about it").

A meta-method: **R**efine the forget set into groups of homogeneous
memorization, then **U**nlearn the groups one after another, each with its
own **M**ethod.

Groups: the forget examples are ranked by their memorization score
(``ctx.extras["forget_scores"]``, aligned with ``ctx.forget``; ties keep
forget-set order) and cut into three rank tertiles of (almost) equal size:
``low``, ``mid``, ``high``. Rank tertiles, not fixed score thresholds,
because score scales differ (Feldman's estimates in [0, 1], loss proxies
unbounded, the 0/1 ``flipped`` record) and ties must not leave a group empty.

Sequence: the groups are unlearned in ``method.rum_order`` (default
low -> mid -> high), group ``rum_order[i]`` with method ``rum_methods[i]``
(one name for all groups also works; empty means ``neggrad``). Every
per-group method runs ``method.epochs`` epochs with the run's method
hyper-parameters and optimizer; RUM's ``epochs`` is their sum.

Engine composition (one ``run_stage``): ``prepare`` returns the streams
``forget_low`` / ``forget_mid`` / ``forget_high`` for the recipe to add;
``phases(epoch)`` picks the group of that epoch and returns its method's
phases with the ``forget`` stream renamed to the group's stream. A group's
method is prepared lazily, the first time one of its epochs is asked for:
so its saliency mask or SCRUB teacher is built from the model as the earlier
groups left it (the sequential semantics of RUM). Note that one lr schedule
spans the whole sequence (use ``train.schedule=constant`` for equal steps).

Hyper-parameters: a group's method averages its forget loss over the group,
a third of the forget set, so at the same ``alpha`` every forget example is
weighted about three times as much as when that method unlearns the whole
set. Raise ``alpha`` accordingly (``1 - (1 - alpha) / 3``): with the alpha
tuned for whole-set Sharp MinMax, its group alone cost 12-17 points of retain
accuracy on memorized digits.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from torch.utils.data import Subset

from sharp_unlearn.config import MethodConfig, OptimizerConfig, check_choice
from sharp_unlearn.data.forget import rank_tertiles
from sharp_unlearn.engine.objective import Phase, SamSpec
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.methods.base import METHODS, UnlearnContext, UnlearningMethod

LEVELS = ("low", "mid", "high")
DEFAULT_GROUP_METHOD = "neggrad"


@dataclasses.dataclass
class RumParams:
    """RUM's settings (keys of the method section); its group methods read theirs from the same section."""

    #: the memorization groups, in the order they are unlearned
    rum_order: list[str] = dataclasses.field(default_factory=lambda: list(LEVELS))
    #: the method of each group of rum_order (one name: all groups; empty: neggrad)
    rum_methods: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        for level in self.rum_order:
            check_choice("method.rum_order", level, LEVELS)
        for name in self.rum_methods:
            METHODS.get(name)  # raises with the list of known names


@dataclasses.dataclass
class RumStage:
    level: str
    method: UnlearningMethod
    positions: np.ndarray
    dataset: object = None
    prepared: bool = False

    @property
    def stream(self) -> str:
        return f"forget_{self.level}"


def _renamed(phase: Phase, level: str) -> Phase:
    stream = f"forget_{level}"
    objectives = [dataclasses.replace(o, stream=stream) if o.stream == "forget" else o for o in phase.objectives]
    driver = stream if phase.driver == "forget" else phase.driver
    return Phase(f"{level}_{phase.name}", objectives, driver=driver, max_steps=phase.max_steps,
                 extras=dict(phase.extras))


@METHODS.register("rum")
class Rum(UnlearningMethod):
    params_class = RumParams
    params: RumParams

    def __init__(self, cfg: MethodConfig, optimizer: OptimizerConfig, sam: SamSpec | None):
        super().__init__(cfg, optimizer, sam)
        order = list(self.params.rum_order)
        if sorted(order) != sorted(LEVELS):
            raise ConfigError(f"method.rum_order={order} must name each of low, mid, high exactly once "
                              "(e.g. [low, mid, high])")
        names = list(self.params.rum_methods) or [DEFAULT_GROUP_METHOD]
        if len(names) == 1:
            names = names * len(order)
        if len(names) != len(order):
            raise ConfigError(f"method.rum_methods={list(self.params.rum_methods)} must hold one method for all "
                              f"groups or one per group of method.rum_order={order} ({len(order)})")
        for name in names:
            if name == "rum" or METHODS.get(name).from_scratch:
                raise ConfigError(f"method.rum_methods may not contain {name!r}; expected unlearning methods "
                                  f"such as neggrad, scrub, salun, sharp_minmax")
        self.order = order
        self.group_methods = {level: name for level, name in zip(order, names)}
        self.stages: list[RumStage] = [
            RumStage(level, METHODS.get(name)(dataclasses.replace(cfg, name=name), optimizer, sam),
                     np.zeros(0, dtype=np.int64))
            for level, name in zip(order, names)]
        self.ctx: UnlearnContext | None = None
        self.prepare_log: list[str] = []  # levels in the order their methods were prepared

    @property
    def streams(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("retain",) + tuple(stage.stream for stage in self.stages)

    def prepare(self, ctx: UnlearnContext) -> dict[str, Subset]:
        scores = ctx.extras.get("forget_scores")
        if scores is None:
            scores = ctx.extras.get("scores")
        if scores is None:
            raise ConfigError("method 'rum' needs memorization scores of the forget examples: use "
                              "forget.kind=memorization (scores from forget.scores)")
        scores = np.asarray(scores, dtype=np.float64)
        if len(scores) != len(ctx.forget):
            raise ConfigError(f"rum got {len(scores)} memorization scores for {len(ctx.forget)} forget examples")
        groups = rank_tertiles(scores)
        stages = []
        for stage in self.stages:
            positions = groups[stage.level]
            if len(positions) == 0:  # fewer than 3 forget examples: nothing to do for this group
                continue
            stage.positions = positions
            stage.dataset = Subset(ctx.forget, positions.tolist())
            stages.append(stage)
        self.stages = stages
        self.ctx = ctx
        return {stage.stream: stage.dataset for stage in self.stages}

    @property
    def epochs(self) -> int:
        return self.cfg.epochs * len(self.stages)

    def stage_at(self, epoch: int) -> tuple[RumStage, int]:
        """The group unlearned in ``epoch`` and the epoch within that group's method."""
        per = self.cfg.epochs
        if per <= 0 or not 0 <= epoch < self.epochs:
            raise IndexError(f"rum has {self.epochs} epochs; epoch {epoch} is out of range")
        return self.stages[epoch // per], epoch % per

    def phases(self, epoch: int) -> list[Phase]:
        if self.ctx is None:
            raise RuntimeError("Rum.prepare(ctx) must run before phases()")
        stage, inner_epoch = self.stage_at(epoch)
        if not stage.prepared:
            # lazily, at the group's first epoch: the model is where the earlier groups left it
            extra = stage.method.prepare(dataclasses.replace(self.ctx, forget=stage.dataset))
            if extra:
                raise ConfigError(f"method {stage.method.cfg.name!r} adds data streams; it cannot run inside rum")
            stage.prepared = True
            self.prepare_log.append(stage.level)
        return [_renamed(phase, stage.level) for phase in stage.method.phases(inner_epoch)]

    @property
    def optimizer_tag(self) -> str:
        tags: list[str] = []
        for stage in self.stages:
            if stage.method.optimizer_tag not in tags:
                tags.append(stage.method.optimizer_tag)
        return "+".join(tags) if tags else self.optimizer_cfg.tag
