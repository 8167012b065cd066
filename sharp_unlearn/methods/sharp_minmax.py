"""Sharp MinMax (Tang & Khanna, ICLR 2026): split the model by forget saliency,
minimize sharpness where the retain set lives, maximize it where the forget set does.

The saliency mask M marks the largest ``mask_fraction`` of ``|grad L_F|`` over
all parameters. Two objectives, stepped together by one base optimizer:

* retain: ``alpha * CE_R`` on the entries outside M (mask ``1 - M``) with
  SAM-min, radius ``rho_min`` and weight ``lamb_min`` (defaults: the
  optimizer's ``rho`` / ``lamb``), adaptive (ASAM) when the optimizer is asam;
* forget: ``-(1 - alpha) * CE_F`` on the entries inside M with SAM-max,
  radius ``rho_max`` / weight ``lamb_max`` (same defaults), adaptive when
  ``adaptive_max`` (``None``: like the retain side).

Switches that run the method as the paper's released code does (defaults:
this description): ``mask_order=smallest`` (M holds the smallest
saliencies), ``forget_mask_scope=perturbed`` (only the forget gradient at
``w+e`` is masked: the update ``g + s*lamb*(M*g(w+e) - g)`` moves every
entry), ``forget_perturbation=full`` (``e`` from the unmasked forget
gradient, normed over all parameters; ``retain_perturbation=full`` likewise
for the retain side) and ``update_order=sequential`` (a
retain step, then a forget step at the updated weights, each with its own
base-optimizer state, so weight decay applies twice per iteration; the lr
schedule still advances once per iteration). The packaged config
``sharp_minmax_paper_code`` sets them all, with the released defaults.

Because each objective's gradient (and its SAM perturbation) is masked,
entries outside M never move for the forget objective and entries inside M
never move for the retain objective. SAM is intrinsic to the method: with
``optimizer.name=sgd|adam|adamw`` the base optimizer is that one and both
sides still use SAM with the radii above (``rho_*=0`` makes a side first
order, and the tag says so). ``optimizer.sign`` is ignored: the signs are the
method's. One epoch is one pass over the retain set (the forget set when
``alpha == 0``).

``sam_sides`` (``both``, ``forget``, ``retain``) keeps SAM on one side only;
the other side is then plain first-order, as with its ``rho_*=0``, and the tag
shows its base optimizer. ``optimizer.sam_every`` / ``sam_fraction`` /
``sam_subset`` make both sides' SAM passes cheaper (exact SAM by default).
"""
from __future__ import annotations

from dataclasses import dataclass

from sharp_unlearn.config import MethodConfig, OptimizerConfig, check_choice, check_range
from sharp_unlearn.engine.objective import Objective, Phase, SamSpec
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.methods.base import (
    METHODS,
    UnlearnContext,
    UnlearningMethod,
    saliency_mask_for,
    scaled,
)
from sharp_unlearn.optim.factory import sam_variant
from sharp_unlearn.optim.saliency import complement

FORGET_MASK_SCOPES = ("update", "perturbed")
PERTURBATIONS = ("masked", "full")
UPDATE_ORDERS = ("joint", "sequential")
SAM_SIDES = ("both", "forget", "retain")


@dataclass
class SharpMinMaxParams:
    """Sharp MinMax's settings (keys of the method section; alpha and the mask ones are shared)."""

    #: SAM radius/weight for the retain part (sharpness minimization); None takes optimizer.rho / optimizer.lamb
    rho_min: float | None = None
    lamb_min: float | None = None
    #: SAM radius/weight for the forget part (sharpness maximization)
    rho_max: float | None = None
    lamb_max: float | None = None
    #: ASAM on the forget (max) side; None follows the min side (adaptive when optimizer.name=asam)
    adaptive_max: bool | None = False
    #: forget side: `update` masks the whole update; `perturbed` masks only the gradient at w+e, so the
    #: combined g + s*lamb*(M*g(w+e) - g) keeps the unmasked clean gradient (released code)
    forget_mask_scope: str = "update"
    #: forget side: SAM perturbation from the `masked` gradient, or the `full` one (all entries)
    forget_perturbation: str = "masked"
    #: retain side: the same choice for the SAM-min perturbation (the released code builds both sides'
    #: perturbations from the unmasked gradient)
    retain_perturbation: str = "masked"
    #: `joint` sums retain and forget into one step; `sequential` steps retain, then forget at the updated
    #: weights, each side with its own base-optimizer state (released code)
    update_order: str = "joint"
    #: the sides that get SAM: `both`, or only `forget` / only `retain` (the other side first-order)
    sam_sides: str = "both"

    def __post_init__(self) -> None:
        for key in ("rho_min", "rho_max", "lamb_min", "lamb_max"):
            value = getattr(self, key)
            if value is not None:
                check_range(f"method.{key}", value, 0.0)
        check_choice("method.forget_mask_scope", self.forget_mask_scope, FORGET_MASK_SCOPES)
        check_choice("method.forget_perturbation", self.forget_perturbation, PERTURBATIONS)
        check_choice("method.retain_perturbation", self.retain_perturbation, PERTURBATIONS)
        check_choice("method.update_order", self.update_order, UPDATE_ORDERS)
        check_choice("method.sam_sides", self.sam_sides, SAM_SIDES)


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value


@METHODS.register("sharp_minmax")
class SharpMinMax(UnlearningMethod):
    params_class = SharpMinMaxParams
    params: SharpMinMaxParams
    mask: dict | None = None
    outside: dict | None = None

    def __init__(self, cfg: MethodConfig, optimizer: OptimizerConfig, sam: SamSpec | None):
        super().__init__(cfg, optimizer, sam)
        params = self.params
        variant = sam_variant(optimizer)
        #: each side's SAM, None for a side that sam_sides leaves first-order
        self.min_spec = SamSpec(rho=_pick(params.rho_min, optimizer.rho),
                                lamb=_pick(params.lamb_min, optimizer.lamb), sign="min", adaptive=optimizer.adaptive,
                                variant=variant) if params.sam_sides in ("both", "retain") else None
        self.max_spec = SamSpec(rho=_pick(params.rho_max, optimizer.rho),
                                lamb=_pick(params.lamb_max, optimizer.lamb), sign="max",
                                adaptive=optimizer.adaptive if params.adaptive_max is None else params.adaptive_max,
                                variant=variant) if params.sam_sides in ("both", "forget") else None

    def prepare(self, ctx: UnlearnContext) -> None:
        self.mask = saliency_mask_for(ctx, self.cfg)
        self.outside = complement(self.mask)  # built once: the engine caches masks by identity
        return None

    def objectives(self) -> list[Objective]:
        if self.mask is None or self.outside is None:
            raise RuntimeError("SharpMinMax.prepare(ctx) must run before phases()")
        params = self.params
        alpha = self.cfg.alpha
        sequential = params.update_order == "sequential"
        objectives = []
        if alpha > 0:
            objectives.append(Objective("retain", "retain", scaled(cross_entropy, alpha), sam=self.min_spec,
                                        mask=self.outside, perturbation=params.retain_perturbation,
                                        step_group="retain" if sequential else None))
        if alpha < 1:
            objectives.append(Objective("forget", "forget", scaled(cross_entropy, -(1.0 - alpha)),
                                        sam=self.max_spec, mask=self.mask, mask_scope=params.forget_mask_scope,
                                        perturbation=params.forget_perturbation,
                                        step_group="forget" if sequential else None))
        return objectives

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("sharp_minmax", self.objectives(), driver="retain" if self.cfg.alpha > 0 else "forget")]

    def _side_tag(self, spec: SamSpec | None) -> str:
        return spec.tag if spec is not None and spec.rho > 0 else self.optimizer_cfg.base_name

    @property
    def optimizer_tag(self) -> str:
        """e.g. ``sam-min/sam-max``, ``asam-min/sam-max``; a side with rho 0 shows its base optimizer."""
        return f"{self._side_tag(self.min_spec)}/{self._side_tag(self.max_spec)}"
