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
"""
from __future__ import annotations

from sharp_unlearn.config import MethodConfig, OptimizerConfig
from sharp_unlearn.engine.objective import Objective, Phase, SamSpec
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.methods.base import (
    METHODS,
    UnlearnContext,
    UnlearningMethod,
    saliency_mask_for,
    scaled,
)
from sharp_unlearn.optim.saliency import complement


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value


@METHODS.register("sharp_minmax")
class SharpMinMax(UnlearningMethod):
    mask: dict | None = None
    outside: dict | None = None

    def __init__(self, cfg: MethodConfig, optimizer: OptimizerConfig, sam: SamSpec | None):
        super().__init__(cfg, optimizer, sam)
        self.min_spec = SamSpec(rho=_pick(cfg.rho_min, optimizer.rho), lamb=_pick(cfg.lamb_min, optimizer.lamb),
                                sign="min", adaptive=optimizer.adaptive)
        self.max_spec = SamSpec(rho=_pick(cfg.rho_max, optimizer.rho), lamb=_pick(cfg.lamb_max, optimizer.lamb),
                                sign="max",
                                adaptive=optimizer.adaptive if cfg.adaptive_max is None else cfg.adaptive_max)

    def prepare(self, ctx: UnlearnContext) -> None:
        self.mask = saliency_mask_for(ctx, self.cfg)
        self.outside = complement(self.mask)  # built once: the engine caches masks by identity
        return None

    def objectives(self) -> list[Objective]:
        if self.mask is None or self.outside is None:
            raise RuntimeError("SharpMinMax.prepare(ctx) must run before phases()")
        cfg = self.cfg
        alpha = cfg.alpha
        sequential = cfg.update_order == "sequential"
        objectives = []
        if alpha > 0:
            objectives.append(Objective("retain", "retain", scaled(cross_entropy, alpha), sam=self.min_spec,
                                        mask=self.outside, perturbation=cfg.retain_perturbation,
                                        step_group="retain" if sequential else None))
        if alpha < 1:
            objectives.append(Objective("forget", "forget", scaled(cross_entropy, -(1.0 - alpha)),
                                        sam=self.max_spec, mask=self.mask, mask_scope=cfg.forget_mask_scope,
                                        perturbation=cfg.forget_perturbation,
                                        step_group="forget" if sequential else None))
        return objectives

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("sharp_minmax", self.objectives(), driver="retain" if self.cfg.alpha > 0 else "forget")]

    def _side_tag(self, spec: SamSpec) -> str:
        return spec.tag if spec.rho > 0 else self.optimizer_cfg.base_name

    @property
    def optimizer_tag(self) -> str:
        """e.g. ``sam-min/sam-max``, ``asam-min/sam-max``; a side with rho 0 shows its base optimizer."""
        return f"{self._side_tag(self.min_spec)}/{self._side_tag(self.max_spec)}"
