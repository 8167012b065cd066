"""Sweep definitions: parse and validate a ``tuning/*.yaml`` file before Ray starts.

A sweep file names the stage searched (``pretrain``, ``unlearn`` or ``both``
chained), the base config, a search space per dotted config key, the
objective (with optional constraints), the scheduler, the searcher and the
resources of one trial. Everything is checked here, against the config
dataclasses themselves, so a typo or an out-of-range bound is a one-line
``ConfigError`` (CLI exit 2) naming the key, never a failed trial minutes
into a cluster run. Nothing in this module imports Ray.

See ``tuning/README.md`` for the file format.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from sharp_unlearn.config import ExperimentConfig, MethodConfig, apply_overrides, load_yaml, merge
from sharp_unlearn.data.forget import PROXIES
from sharp_unlearn.engine.checkpoint import load_checkpoint
from sharp_unlearn.engine.deepspeed_config import validate_distributed
from sharp_unlearn.errors import ConfigError, MissingExtra
from sharp_unlearn.model_store import resolve_checkpoint
from sharp_unlearn.validation import config_from_dict, method_param_classes

STAGES = ("pretrain", "unlearn", "both")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "optuna")
CONSTRAINT_MODES = ("penalty", "filter")
MODES = ("max", "min")
TOP_LEVEL_KEYS = ("name", "description", "stage", "base", "checkpoint", "unlearn", "forget", "method", "config",
                  "pretrain", "search", "objective", "scheduler", "searcher", "num_samples", "max_concurrent",
                  "resources", "max_failures", "keep_checkpoints", "time_budget_s", "output_dir", "storage")

#: what a trial reports, per stage searched (constraints and objectives must name one of these)
UNLEARN_METRICS = ("tow", "retain_acc", "forget_acc", "val_acc", "test_acc", "forget_gap", "train_loss",
                   "test_acc_drop", "retain_acc_drop", "wall_seconds")
PRETRAIN_METRICS = ("val_acc", "train_loss")
#: metrics that get better when they go down (the default mode is max for everything else)
LOWER_IS_BETTER = ("train_loss", "test_acc_drop", "retain_acc_drop", "forget_acc", "wall_seconds")
#: objective value of a trial that breaks a constraint under ``constraint_mode: filter``, or diverged
WORST = 1e9

#: keys a sweep manages itself; searching them would be meaningless or break the shared inputs
_MANAGED = ("tracking", "output_dir", "device", "distributed")
#: data keys an unlearning run may change without changing the data the model was trained on
_UNLEARN_DATA_KEYS = ("batch_size", "eval_batch_size", "num_workers")


# --------------------------------------------------------------------------- pieces
@dataclass
class Dimension:
    """One searched key: ``method.alpha: {uniform: [0.8, 0.99]}``."""

    key: str                 # as written in the file (the Tune param name)
    target: str              # "pretrain" or "unlearn": which config tree it changes
    path: tuple[str, ...]    # the dotted path inside that tree
    kind: str                # one of DISTRIBUTIONS
    values: list[Any] = field(default_factory=list)   # grid / choice
    low: float | int | None = None                     # uniform / loguniform / randint (high exclusive)
    high: float | int | None = None

    def candidates(self) -> list[Any]:
        """Values checked against the config schema: every listed value, or both bounds."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        if self.kind == "randint":
            return [self.low, self.high - 1]
        return [self.low, self.high]

    @property
    def size(self) -> int:
        """Trials per sample this dimension multiplies (grids expand, everything else is sampled)."""
        return len(self.values) if self.kind == "grid" else 1


@dataclass
class Constraint:
    """``test_acc_drop <= 2``: a bound on a reported metric."""

    metric: str
    op: str
    bound: float

    def violation(self, metrics: dict[str, float]) -> float:
        value = metrics.get(self.metric)
        if value is None or value != value:  # missing or NaN: the worst case
            return math.inf
        if self.op in ("<=", "<"):
            return max(0.0, float(value) - self.bound)
        return max(0.0, self.bound - float(value))

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


@dataclass
class Objective:
    metric: str = "tow"
    mode: str = "max"
    constraints: list[Constraint] = field(default_factory=list)
    constraint_mode: str = "penalty"
    #: penalty mode: objective = metric -/+ penalty_weight * total violation (in the constrained metric's units)
    penalty_weight: float = 0.01

    def score(self, metrics: dict[str, float]) -> dict[str, float]:
        """``objective``, ``feasible`` (1/0) and ``constraint_violation`` for one reported result."""
        worst = -WORST if self.mode == "max" else WORST
        raw = metrics.get(self.metric)
        violation = sum(c.violation(metrics) for c in self.constraints)
        feasible = violation == 0.0
        if raw is None or raw != raw or math.isinf(violation):
            return {"objective": worst, "feasible": 0.0,
                    "constraint_violation": float("nan") if math.isinf(violation) else violation}
        if feasible:
            value = float(raw)
        elif self.constraint_mode == "filter":
            value = worst
        else:
            sign = -1.0 if self.mode == "max" else 1.0
            value = float(raw) + sign * self.penalty_weight * violation
        return {"objective": value, "feasible": 1.0 if feasible else 0.0, "constraint_violation": violation}

    def describe(self) -> str:
        text = f"{self.mode} {self.metric}"
        if self.constraints:
            how = (f"penalty {self.penalty_weight:g} per unit" if self.constraint_mode == "penalty"
                   else "infeasible trials filtered")
            text += f" s.t. {', '.join(map(str, self.constraints))} ({how})"
        return text


@dataclass
class SchedulerSpec:
    name: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass
class SearcherSpec:
    name: str = "random"
    seed: int | None = 0


@dataclass
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0

    @property
    def threads(self) -> int:
        """torch threads inside a trial: its whole CPUs (at least one)."""
        return max(1, int(self.cpu))


#: the CPU a sharded trial's own process reserves: it only starts the Train run and relays its reports
#: (Ray refuses 0), so N workers of one CPU each still fit N CPUs but for this sliver
SHARDED_DRIVER_CPU = 0.01


@dataclass
class Sharding:
    """How every trial of a sharded sweep trains: one Ray Train DeepSpeed run of ``num_workers`` ranks."""

    zero_stage: int
    num_workers: int
    use_gpu: bool
    #: which stages of a trial run sharded (stage both may shard pretraining, unlearning or both)
    stages: tuple[str, ...] = ()


@dataclass
class SweepSpec:
    name: str
    stage: str
    dims: list[Dimension]
    objective: Objective
    scheduler: SchedulerSpec
    searcher: SearcherSpec
    num_samples: int
    resources: Resources
    max_failures: int = 2
    max_concurrent: int | None = None
    keep_checkpoints: int = 2
    time_budget_s: float | None = None
    #: full pretraining config tree (stages pretrain/both; unlearn without a checkpoint)
    pretrain_tree: dict[str, Any] | None = None
    #: existing pretrained checkpoint (stage unlearn)
    checkpoint: str | None = None
    #: merged over the pretrained checkpoint's config to form an unlearning run's config
    unlearn_overrides: dict[str, Any] = field(default_factory=dict)
    #: the unlearning config tree before search (stage unlearn/both; known statically)
    unlearn_tree: dict[str, Any] | None = None
    output_dir: str = "runs"
    storage: str | None = None
    source: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    #: set when trials are DeepSpeed ZeRO jobs (``distributed.backend: deepspeed``); ``resources`` is then per worker
    sharded: Sharding | None = None

    # -- derived -------------------------------------------------------------
    def trial_resources(self) -> dict[str, float]:
        """What one trial takes from the cluster, in all: its own process plus, sharded, its workers."""
        if self.sharded is None:
            return {"CPU": self.resources.cpu, "GPU": self.resources.gpu}
        workers = self.sharded.num_workers
        return {"CPU": SHARDED_DRIVER_CPU + workers * self.resources.cpu, "GPU": workers * self.resources.gpu}

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dims]

    @property
    def grid_size(self) -> int:
        return math.prod(d.size for d in self.dims)

    @property
    def total_trials(self) -> int:
        """Ray repeats the grid ``num_samples`` times, each with fresh random draws."""
        return self.num_samples * self.grid_size

    @property
    def searched_stage_tree(self) -> dict[str, Any]:
        return self.pretrain_tree if self.stage == "pretrain" else self.unlearn_tree

    def trial_trees(self, params: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(pretraining tree, unlearning tree) of one trial's sampled ``params`` (before building)."""
        return resolve_trial_trees(self.stage, self.dims, params, self.pretrain_tree, self.unlearn_tree,
                                   self.unlearn_overrides)

    def trial_configs(self, params: dict[str, Any]) -> tuple[ExperimentConfig | None, ExperimentConfig | None]:
        pre, un = self.trial_trees(params)
        return (config_from_dict(pre) if pre is not None else None,
                config_from_dict(un) if un is not None else None)

    def max_epochs(self) -> int:
        """The longest a trial can run in reported epochs (ASHA's ``max_t``)."""
        path = ("train", "epochs") if self.stage == "pretrain" else ("method", "epochs")
        target = "pretrain" if self.stage == "pretrain" else "unlearn"
        tree = self.searched_stage_tree
        values = [dims_value for d in self.dims if d.target == target
                  for dims_value in _epoch_candidates(d, path)]
        default = config_from_dict(tree)
        base = default.train.epochs if self.stage == "pretrain" else default.method.epochs
        return int(max([base, *values]))


def _epoch_candidates(dim: Dimension, path: tuple[str, ...]) -> list[int]:
    if dim.path == path:
        return [int(v) for v in dim.candidates()]
    if dim.path == path[:1] and dim.kind in ("grid", "choice"):  # a whole section: {grid: [{epochs: 5}, ...]}
        return [int(v[path[1]]) for v in dim.values if isinstance(v, dict) and path[1] in v]
    return []


# --------------------------------------------------------------------------- trees
def set_path(tree: dict[str, Any], path: Sequence[str], value: Any) -> dict[str, Any]:
    """A copy of ``tree`` with ``path`` set; a mapping value is merged into a section."""
    out = copy.deepcopy(tree)
    node = out
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    last = path[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict) and last != "options":
        node[last] = merge(node[last], copy.deepcopy(value))
    else:
        node[last] = copy.deepcopy(value)
    return out


def resolve_trial_trees(stage: str, dims: Sequence[Dimension], params: dict[str, Any],
                        pretrain_tree: dict[str, Any] | None, unlearn_tree: dict[str, Any] | None,
                        unlearn_overrides: dict[str, Any]) -> tuple[dict | None, dict | None]:
    """Apply a trial's sampled values to the base trees.

    Stage ``both``: the unlearning tree is rebuilt from the trial's own
    pretraining config, as ``unlearn_config`` would do with its checkpoint.
    """
    pre = copy.deepcopy(pretrain_tree) if pretrain_tree is not None else None
    for dim in dims:
        if dim.target == "pretrain" and dim.key in params:
            pre = set_path(pre, dim.path, params[dim.key])
    if stage == "pretrain":
        return pre, None
    if stage == "both":
        base = config_from_dict(pre).to_dict()
        base.pop("forget", None)
        base.pop("method", None)
        un = merge(base, copy.deepcopy(unlearn_overrides))
    else:
        un = copy.deepcopy(unlearn_tree)
    for dim in dims:
        if dim.target == "unlearn" and dim.key in params:
            un = set_path(un, dim.path, params[dim.key])
    return pre, un


# --------------------------------------------------------------------------- key checks
def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) is not None and type(None) in get_args(annotation):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return inner[0] if len(inner) == 1 else annotation
    return annotation


def check_config_path(key: str, parts: Sequence[str]) -> str:
    """Check a dotted path against the ExperimentConfig dataclasses; 'section' or 'value'.

    Raises ConfigError naming the offending key and the keys that exist there.
    """
    cls: Any = ExperimentConfig
    where = ""
    for i, part in enumerate(parts):
        known = {f.name for f in dataclasses.fields(cls)}
        if cls is MethodConfig:  # beside the shared keys, the settings each method declares (typed there)
            settings = method_param_classes()
            known = (known - {MethodConfig.open_params_field}) | set(settings)
            if part in settings:
                cls = settings[part]
        if part not in known:
            section = where.rstrip(".") or "the config"
            raise ConfigError(f"search key {key!r}: unknown key {where + part!r} in {section}; "
                              f"expected one of: {', '.join(sorted(known))}")
        annotation = _unwrap_optional(get_type_hints(cls)[part])
        rest = parts[i + 1:]
        if dataclasses.is_dataclass(annotation):
            if not rest:
                return "section"
            cls, where = annotation, where + part + "."
            continue
        if get_origin(annotation) is dict:  # free-form options: any sub-key
            return "value"
        if rest:
            raise ConfigError(f"search key {key!r}: {where + part!r} is a value, not a section; "
                              f"nothing can follow it")
        return "value"
    return "section"  # pragma: no cover - parts is never empty


def _target_of(key: str, stage: str) -> tuple[str, list[str]]:
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"search key {key!r} is malformed; expected a dotted config key such as method.alpha")
    if parts[0] in ("pretrain", "unlearn") and len(parts) > 1:
        target, rest = parts[0], parts[1:]
        if stage != "both" and target != stage:
            raise ConfigError(f"search key {key!r} targets the {target} stage, but this sweep searches "
                              f"stage {stage!r}; use stage: both to search both")
        return target, rest
    if stage != "both":
        return stage, parts
    if parts[0] in ("method", "forget"):
        return "unlearn", parts
    raise ConfigError(f"search key {key!r} is ambiguous in stage 'both' (pretraining and unlearning both have it); "
                      f"write pretrain.{key} or unlearn.{key}")


def _check_target_rules(key: str, target: str, stage: str, parts: Sequence[str]) -> None:
    head = parts[0]
    if head in _MANAGED:
        raise ConfigError(f"search key {key!r}: {head} is managed by the sweep (not searchable); "
                          f"set it in the base config instead")
    if target == "pretrain" and head in ("forget", "method"):
        raise ConfigError(f"search key {key!r}: {head}.* is not part of pretraining; "
                          f"search it with stage: unlearn or both")
    if target == "unlearn":
        if head == "model" or (head == "data" and (len(parts) == 1 or parts[1] not in _UNLEARN_DATA_KEYS)):
            raise ConfigError(f"search key {key!r} would change the data or the model the pretrained checkpoint "
                              f"was trained with; search it on the pretraining side (stage: both, "
                              f"pretrain.{'.'.join(parts)})")
        if head == "forget" and stage == "unlearn":
            raise ConfigError(f"search key {key!r}: in stage 'unlearn' one forget set (and its retrained "
                              f"reference) is shared by all trials; search forget.* with stage: both")


def parse_dimension(key: str, spec: Any, stage: str, optuna: bool) -> Dimension:
    target, parts = _target_of(str(key), stage)
    kind_of_path = check_config_path(str(key), parts)
    _check_target_rules(str(key), target, stage, parts)
    return parse_distribution(Dimension(str(key), target, tuple(parts), ""), spec, optuna, kind_of_path)


def parse_distribution(dim: Dimension, spec: Any, optuna: bool, kind_of_path: str = "value") -> Dimension:
    """``dim`` (key and path already checked) with its distribution from ``spec``; ``kind_of_path`` says
    whether the path names a config ``section`` (searched by mappings) or a ``value``."""
    key, parts = dim.key, dim.path
    expected = f"one of {', '.join(DISTRIBUTIONS)} as a mapping, e.g. {{uniform: [0.01, 0.2]}}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"search space {key!r}: {spec!r} is not a distribution; expected {expected}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"search space {key!r}: unknown distribution {kind!r}; expected {expected}")
    dim.kind = kind
    if kind in ("grid", "choice"):
        if not isinstance(args, list):
            raise ConfigError(f"search space {key!r}: {kind} needs a list of values, got {args!r}")
        if not args:
            raise ConfigError(f"search space {key!r}: empty {kind}; expected at least one value")
        if kind_of_path == "section" and not all(isinstance(v, dict) for v in args):
            raise ConfigError(f"search space {key!r}: {'.'.join(parts)} is a section; every {kind} value "
                              f"must be a mapping of its keys (e.g. {{name: sam, rho: 0.05}})")
        if kind_of_path == "value" and any(isinstance(v, dict) for v in args) and parts[-1] != "options":
            raise ConfigError(f"search space {key!r}: {'.'.join(parts)} is a value; {kind} values must not be "
                              f"mappings")
        if optuna and kind == "grid":
            raise ConfigError(f"search space {key!r}: the optuna searcher does not take grid dimensions; "
                              f"use choice, or searcher: random")
        if optuna and any(isinstance(v, (dict, list)) for v in args):
            raise ConfigError(f"search space {key!r}: the optuna searcher needs scalar choices "
                              f"(numbers, strings, booleans)")
        dim.values = list(args)
        return dim
    if kind_of_path == "section":
        raise ConfigError(f"search space {key!r}: {'.'.join(parts)} is a section; "
                          f"only grid or choice over mappings can search it")
    if not (isinstance(args, list) and len(args) == 2
            and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
        raise ConfigError(f"search space {key!r}: {kind} needs [low, high] (two numbers), got {args!r}")
    low, high = args
    if kind == "randint":
        if not all(isinstance(a, int) or float(a).is_integer() for a in args):
            raise ConfigError(f"search space {key!r}: randint bounds must be integers, got {args!r}")
        low, high = int(low), int(high)
        if high <= low:
            raise ConfigError(f"search space {key!r}: randint [{low}, {high}) is empty; expected low < high "
                              f"(high is exclusive)")
    else:
        low, high = float(low), float(high)
        if not low < high:
            raise ConfigError(f"search space {key!r}: {kind} [{low:g}, {high:g}] needs low < high")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"search space {key!r}: loguniform needs low > 0, got {low:g}")
    dim.low, dim.high = low, high
    return dim


def _check_values(dim: Dimension, tree: dict[str, Any]) -> None:
    """Build the config with every candidate value so schema checks (rho >= 0, known names) run now."""
    for value in dim.candidates():
        try:
            config_from_dict(set_path(tree, dim.path, value))
        except ConfigError as exc:
            what = "bound" if dim.kind in ("uniform", "loguniform", "randint") else "value"
            raise ConfigError(f"search space {dim.key!r}: {what} {value!r} is invalid: {exc}") from None


# --------------------------------------------------------------------------- objective etc.
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def _known_metric(name: str, stage: str) -> bool:
    known = PRETRAIN_METRICS if stage == "pretrain" else UNLEARN_METRICS
    return name in known or name.startswith("loss_") or (stage != "pretrain" and name.startswith("forget_acc_"))


def _metric_error(what: str, name: str, stage: str) -> ConfigError:
    known = PRETRAIN_METRICS if stage == "pretrain" else UNLEARN_METRICS
    return ConfigError(f"{what} {name!r} is not reported by {stage} trials; expected one of: {', '.join(known)} "
                       f"(or loss_*{'' if stage == 'pretrain' else ', forget_acc_<level>'})")


@dataclass(frozen=True)
class ReportedMetrics:
    """What a kind of trial reports, for checking an objective against it (LM sweeps have their own)."""

    names: tuple[str, ...]
    default: str
    lower_is_better: tuple[str, ...] = ()
    what: str = "these"

    def check(self, kind: str, name: str) -> None:
        if name not in self.names:
            raise ConfigError(f"{kind} {name!r} is not reported by {self.what} trials; expected one of: "
                              f"{', '.join(self.names)}")


def parse_objective(raw: Any, stage: str, reported: ReportedMetrics | None = None) -> Objective:
    """The objective of a sweep of ``stage`` (metrics checked against what its trials report), or of
    trials reporting ``reported``."""
    default_metric = reported.default if reported else ("val_acc" if stage == "pretrain" else "tow")
    if raw is None:
        raw = {}
    if isinstance(raw, str):
        raw = {"metric": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"objective must be a metric name or a mapping, got {raw!r}")
    unknown = sorted(set(raw) - {"metric", "mode", "constraints", "constraint_mode", "penalty_weight"})
    if unknown:
        raise ConfigError(f"unknown key objective.{unknown[0]}; expected one of: constraint_mode, constraints, "
                          f"metric, mode, penalty_weight")

    def check(kind: str, name: str) -> None:
        if reported is not None:
            reported.check(kind, name)
        elif not _known_metric(name, stage):
            raise _metric_error(kind, name, stage)

    metric = str(raw.get("metric", default_metric))
    check("objective.metric", metric)
    lower = reported.lower_is_better if reported else LOWER_IS_BETTER
    mode = str(raw.get("mode", "min" if metric in lower or metric.startswith("loss_") else "max"))
    if mode not in MODES:
        raise ConfigError(f"objective.mode={mode!r} is not valid; expected one of: max, min")
    cmode = str(raw.get("constraint_mode", "penalty"))
    if cmode not in CONSTRAINT_MODES:
        raise ConfigError(f"objective.constraint_mode={cmode!r} is not valid; expected one of: penalty, filter")
    try:
        weight = float(raw.get("penalty_weight", 0.01))
    except (TypeError, ValueError):
        raise ConfigError(f"objective.penalty_weight={raw.get('penalty_weight')!r} is not a number") from None
    if not weight > 0:
        raise ConfigError(f"objective.penalty_weight={weight:g} must be > 0")
    texts = raw.get("constraints") or []
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        raise ConfigError(f"objective.constraints must be a list like ['test_acc_drop <= 2'], got {texts!r}")
    constraints = []
    for text in texts:
        match = _CONSTRAINT.match(str(text))
        if not match:
            raise ConfigError(f"objective constraint {text!r} is malformed; expected 'METRIC OP NUMBER' "
                              f"with OP one of <=, >=, <, > (e.g. 'test_acc_drop <= 2')")
        name, op, bound = match.group(1), match.group(2), float(match.group(3))
        check("constraint metric", name)
        constraints.append(Constraint(name, op, bound))
    return Objective(metric, mode, constraints, cmode, weight)


def mapping_setting(raw: Any, what: str, shorthand: str | None = None) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, str) and shorthand:
        return {shorthand: raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} must be a mapping, got {raw!r}")
    return raw


def _only(raw: dict[str, Any], allowed: Sequence[str], what: str) -> None:
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key {what}.{unknown[0]}; expected one of: {', '.join(sorted(allowed))}")


def int_setting(raw: Any, what: str, low: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or float(raw) != int(raw):
        raise ConfigError(f"{what}={raw!r} is not an integer")
    if int(raw) < low:
        raise ConfigError(f"{what}={raw!r} is out of range; expected an integer >= {low}")
    return int(raw)


def _number(raw: Any, what: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ConfigError(f"{what}={raw!r} is not a number")
    return float(raw)


def parse_scheduler(raw: Any) -> SchedulerSpec:
    raw = mapping_setting(raw, "scheduler", "name")
    _only(raw, ("name", "grace_period", "reduction_factor"), "scheduler")
    name = str(raw.get("name", "asha"))
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler.name={name!r} is not valid; expected one of: {', '.join(SCHEDULERS)}")
    grace = int_setting(raw.get("grace_period", 1), "scheduler.grace_period", 1)
    factor = _number(raw.get("reduction_factor", 2), "scheduler.reduction_factor")
    if not factor > 1:
        raise ConfigError(f"scheduler.reduction_factor={factor:g} must be > 1")
    return SchedulerSpec(name, grace, factor)


def parse_searcher(raw: Any) -> SearcherSpec:
    raw = mapping_setting(raw, "searcher", "name")
    _only(raw, ("name", "seed"), "searcher")
    name = str(raw.get("name", "random"))
    if name not in SEARCHERS:
        raise ConfigError(f"searcher.name={name!r} is not valid; expected one of: {', '.join(SEARCHERS)}")
    seed = raw.get("seed", 0)
    if seed is not None:
        seed = int_setting(seed, "searcher.seed", 0)
    if name == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise MissingExtra("optuna", "optuna")
    return SearcherSpec(name, seed)


def check_sharded(stage: str, pre_tree: dict[str, Any] | None,
                  unlearn_tree: dict[str, Any] | None) -> Sharding | None:
    """Which trained stages are ZeRO-sharded, checked (ZeRO stage, DeepSpeed JSON, launcher) before Ray starts.

    Only the stages a trial trains count: in stage ``unlearn`` the pretrained model and the
    reference are trained once by the sweep's driver (sharded or not, as their config says).
    """
    trained = {"pretrain": ("pretrain",), "unlearn": ("unlearn",), "both": ("pretrain", "unlearn")}[stage]
    trees = {"pretrain": pre_tree, "unlearn": unlearn_tree}
    found: dict[str, Any] = {}
    for name in trained:
        cfg = config_from_dict(trees[name])
        if cfg.distributed.backend == "deepspeed":
            found[name] = cfg
    if not found:
        return None
    if len(found) != len(trained):
        plain = next(name for name in trained if name not in found)
        raise ConfigError(f"stage 'both' shards {next(iter(found))} but not {plain} (distributed.backend "
                          f"differs); a trial's own process only starts its workers, so both stages must set "
                          f"distributed.backend=deepspeed")
    layouts = {(c.distributed.num_workers, c.distributed.use_gpu) for c in found.values()}
    if len(layouts) > 1:
        raise ConfigError("stage 'both': pretraining and unlearning must use the same distributed.num_workers "
                          "and distributed.use_gpu (one trial holds one set of workers at a time)")
    for cfg in found.values():
        dist = cfg.distributed
        if dist.launcher != "ray":
            raise ConfigError(f"distributed.launcher={dist.launcher!r}: sharded sweep trials start their workers "
                              f"with Ray Train on the sweep's cluster; set distributed.launcher=ray")
        if dist.address:
            raise ConfigError(f"distributed.address={dist.address!r}: a sweep's trials run on the sweep's own Ray "
                              f"cluster; pass it as `sharp-unlearn sweep --address` instead")
        # the DeepSpeed JSON against the run config; workers against the cluster once Ray is up
        validate_distributed(cfg, available={"CPU": 10**9, "GPU": 10**9})
    first = next(iter(found.values())).distributed
    return Sharding(first.zero_stage, first.num_workers, first.use_gpu, tuple(found))


def _sharded_resources(sharded: Sharding, resources: Resources, raw: dict[str, Any]) -> Resources:
    """Per-worker resources of a sharded sweep; ``gpu`` defaults to what ``distributed.use_gpu`` says."""
    # every rank of a ZeRO job drives exactly one accelerator, or none
    wanted = 1.0 if sharded.use_gpu else 0.0
    if not isinstance(raw, dict) or "gpu" not in raw:
        return Resources(resources.cpu, wanted)
    if resources.gpu != wanted:
        raise ConfigError(f"resources.gpu={resources.gpu:g}: in a sharded sweep resources are per worker and each "
                          f"rank uses {'one GPU' if sharded.use_gpu else 'no GPU'} "
                          f"(distributed.use_gpu={str(sharded.use_gpu).lower()}); expected resources.gpu={wanted:g}")
    return resources


def parse_resources(raw: Any) -> Resources:
    raw = mapping_setting(raw, "resources")
    _only(raw, ("cpu", "gpu"), "resources")
    cpu = _number(raw.get("cpu", 1), "resources.cpu")
    gpu = _number(raw.get("gpu", 0), "resources.gpu")
    if not cpu > 0:  # Ray refuses a trial with 0 CPUs; fractions (0.5) are fine
        raise ConfigError(f"resources.cpu={cpu:g} must be > 0 (fractions such as 0.5 are allowed)")
    if gpu < 0:
        raise ConfigError(f"resources.gpu={gpu:g} must be >= 0")
    return Resources(cpu, gpu)


# --------------------------------------------------------------------------- base configs
def _absolute_uri(uri: str | None) -> str | None:
    """A relative sqlite path resolved now, so trials (another cwd) and the driver agree."""
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rest = uri[len("sqlite:///"):]
        path, _, query = rest.partition("?")
        if path and path != ":memory:":
            return "sqlite:///" + str(Path(path).resolve()) + (f"?{query}" if query else "")
    return uri


def _absolute_paths(tree: dict[str, Any] | None) -> dict[str, Any] | None:
    """Relative file paths in a config resolved now: trials run in other directories (and on other nodes)."""
    if tree is None:
        return None
    tree = copy.deepcopy(tree)

    def fix(section: str, key: str, keep=()) -> None:
        node = tree.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and node[key] not in keep \
                and not node[key].startswith("proxy:") and "://" not in node[key]:
            node[key] = str(Path(node[key]).expanduser().resolve())

    fix("data", "root")
    fix("forget", "scores", keep=PROXIES)
    fix("method", "mask_path")
    fix("distributed", "deepspeed_config")
    return tree


def _checkpoint_config(path: str) -> dict[str, Any]:
    state = load_checkpoint(resolve_checkpoint(path))
    if "config" not in state:
        raise ConfigError(f"checkpoint {path!r} carries no config; expected a sharp-unlearn pretrained checkpoint")
    return state["config"]


def _strip_unlearning(tree: dict[str, Any]) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    tree.pop("forget", None)
    tree.pop("method", None)
    return tree


def _normalize_base(raw: dict[str, Any], stage: str) -> tuple[dict | None, str | None, dict[str, Any]]:
    """(pretraining tree, checkpoint, unlearning overrides) from either accepted shape.

    Demo shape: ``base`` (the pretraining config), ``unlearn`` (overrides of the
    unlearning run), ``forget``, ``method``, optional ``checkpoint``.
    Config shape: ``config`` (the searched stage's ExperimentConfig tree, with
    forget and method for unlearning) and ``pretrain`` (``checkpoint: PATH`` or
    the pretraining recipe's optimizer/train sections).
    """
    if "config" in raw and ("base" in raw or "unlearn" in raw):
        raise ConfigError("a sweep file takes either `config` (+ `pretrain`) or `base` (+ `unlearn`, `forget`, "
                          "`method`), not both")
    checkpoint = raw.get("checkpoint")
    if "config" in raw:
        config = mapping_setting(raw["config"], "config")
        pretrain = mapping_setting(raw.get("pretrain"), "pretrain")
        if stage == "pretrain":
            if pretrain:
                raise ConfigError("stage 'pretrain' searches `config` itself; remove the `pretrain` section")
            return copy.deepcopy(config), None, {}
        checkpoint = pretrain.get("checkpoint", checkpoint)
        recipe = {k: v for k, v in pretrain.items() if k != "checkpoint"}
        if checkpoint:
            if recipe:
                raise ConfigError(f"`pretrain` has a checkpoint and a recipe ({', '.join(sorted(recipe))}); "
                                  f"give one: the checkpoint is used as it is")
            return None, checkpoint, copy.deepcopy(config)
        pre = merge({k: v for k, v in config.items() if k not in ("forget", "method", "optimizer", "train")},
                    recipe)
        return pre, checkpoint, copy.deepcopy(config)
    for key in ("forget", "method"):
        if key in raw and stage == "pretrain":
            raise ConfigError(f"stage 'pretrain' does not use `{key}`; remove it or use stage: both")
    base = mapping_setting(raw.get("base"), "base") if "base" in raw else None
    overrides = copy.deepcopy(mapping_setting(raw.get("unlearn"), "unlearn"))
    for key in ("forget", "method"):
        if key in raw:
            overrides[key] = merge(overrides.get(key) or {}, mapping_setting(raw[key], key))
    return (copy.deepcopy(base) if base is not None else None), checkpoint, overrides


# --------------------------------------------------------------------------- loading
def load_sweep(path: str | os.PathLike, overrides: Sequence[str] = (), *, num_samples: int | None = None,
               max_concurrent: int | None = None, storage: str | None = None, name: str | None = None,
               tracking: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep file (plus ``key=value`` overrides of it); no Ray involved."""
    raw = apply_overrides(load_yaml(path), overrides)
    return parse_sweep(raw, source=str(path), num_samples=num_samples, max_concurrent=max_concurrent,
                       storage=storage, name=name, default_name=Path(str(path)).stem, tracking=tracking)


def parse_sweep(raw: dict[str, Any], *, source: str | None = None, num_samples: int | None = None,
                max_concurrent: int | None = None, storage: str | None = None, name: str | None = None,
                default_name: str = "sweep", tracking: dict[str, Any] | None = None) -> SweepSpec:
    """Validate a sweep definition; keyword arguments (the CLI's options) win over the file's keys."""
    if raw.get("task") == "lm":  # the language-model task has its own trials (tuning/lm.py)
        raise ConfigError("this sweep file says task: lm; load it with sharp_unlearn.tuning.lm.load_lm_sweep "
                          "(`sharp-unlearn sweep` does)")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in the sweep file; expected one of: "
                          f"{', '.join(sorted(TOP_LEVEL_KEYS))}")
    stage = str(raw.get("stage", "unlearn"))
    if stage not in STAGES:
        raise ConfigError(f"stage={stage!r} is not valid; expected one of: {', '.join(STAGES)}")
    name = str(name or raw.get("name") or default_name)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"sweep name {name!r} must use only letters, digits, '_', '.', '-'")

    pre_tree, checkpoint, overrides = _normalize_base(raw, stage)
    pre_tree, overrides = _absolute_paths(pre_tree), _absolute_paths(overrides)
    if stage == "both" and checkpoint:
        raise ConfigError("stage 'both' pretrains in every trial; a `checkpoint` only fits stage: unlearn")
    if stage in ("pretrain", "both") and pre_tree is None:
        raise ConfigError(f"stage {stage!r} needs a base config: `base:` (or `config:`) with data, model, "
                          f"optimizer, train")
    if stage == "unlearn" and pre_tree is None and not checkpoint:
        raise ConfigError("stage 'unlearn' needs a pretrained model: `checkpoint: PATH` or a `base:` "
                          "pretraining config (trained once, before the trials)")

    # where files go and where runs are logged: one absolute place for the driver and every trial
    out_base = raw.get("output_dir") or (pre_tree or {}).get("output_dir") or overrides.get("output_dir") or "runs"
    output_dir = str(Path(str(out_base)).expanduser().resolve())
    tracking_tree = merge((pre_tree or {}).get("tracking") or {}, overrides.get("tracking") or {})
    tracking_tree = merge(tracking_tree, tracking or {})
    if tracking_tree.get("uri"):
        tracking_tree["uri"] = _absolute_uri(str(tracking_tree["uri"]))
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        tracking_tree["uri"] = _absolute_uri(os.environ["MLFLOW_TRACKING_URI"])
    managed = {"output_dir": output_dir, "tracking": tracking_tree}
    if pre_tree is not None:
        pre_tree = merge(pre_tree, managed)
        pre_tree.pop("forget", None)
        pre_tree.pop("method", None)
        config_from_dict(pre_tree)  # the base itself must be valid before any search value is tried
    unlearn_tree = None
    if stage != "pretrain":
        if checkpoint:
            checkpoint = str(Path(str(checkpoint)).expanduser().resolve())
            base_un = _strip_unlearning(_checkpoint_config(checkpoint))
        else:
            base_un = _strip_unlearning(config_from_dict(pre_tree).to_dict())
        overrides = merge(overrides, managed)
        unlearn_tree = merge(base_un, overrides)
        cfg = config_from_dict(unlearn_tree)
        if cfg.method is None:
            raise ConfigError(f"stage {stage!r} needs an unlearning method: `method: {{name: sharp_minmax, ...}}`")
        if cfg.forget is None:
            raise ConfigError(f"stage {stage!r} needs a forget set: `forget: {{kind: memorization, size: ...}}`")

    sharded = check_sharded(stage, pre_tree, unlearn_tree)
    searcher = parse_searcher(raw.get("searcher"))
    space = raw.get("search")
    if not isinstance(space, dict) or not space:
        raise ConfigError("the sweep has no search space; expected `search:` mapping dotted config keys to "
                          "distributions, e.g. method.alpha: {uniform: [0.8, 0.99]}")
    dims = [parse_dimension(key, spec, stage, searcher.name == "optuna") for key, spec in space.items()]
    for dim in dims:
        _check_values(dim, pre_tree if dim.target == "pretrain" else unlearn_tree)
    objective = parse_objective(raw.get("objective"), stage)
    scheduler = parse_scheduler(raw.get("scheduler"))
    resources = parse_resources(raw.get("resources"))
    if sharded is not None:
        resources = _sharded_resources(sharded, resources, raw.get("resources") or {})
    samples = num_samples if num_samples is not None else raw.get("num_samples", 1)
    samples = int_setting(samples, "num_samples", 1)
    concurrent = max_concurrent if max_concurrent is not None else raw.get("max_concurrent")
    if concurrent is not None:
        concurrent = int_setting(concurrent, "max_concurrent", 1)
    failures = int_setting(raw.get("max_failures", 2), "max_failures", 0)
    keep = int_setting(raw.get("keep_checkpoints", 2), "keep_checkpoints", 1)
    budget = raw.get("time_budget_s")
    if budget is not None:
        budget = _number(budget, "time_budget_s")
        if not budget > 0:
            raise ConfigError(f"time_budget_s={budget:g} must be > 0")
    storage = storage or raw.get("storage")
    if storage and "://" not in str(storage):
        storage = str(Path(str(storage)).expanduser().resolve())
    spec = SweepSpec(name=name, stage=stage, dims=dims, objective=objective, scheduler=scheduler,
                     searcher=searcher, num_samples=samples, resources=resources, max_failures=failures,
                     max_concurrent=concurrent, keep_checkpoints=keep, time_budget_s=budget,
                     pretrain_tree=pre_tree, checkpoint=checkpoint, unlearn_overrides=overrides,
                     unlearn_tree=unlearn_tree, output_dir=output_dir,
                     storage=storage or str(Path(output_dir) / "sweeps"), source=source, raw=copy.deepcopy(raw),
                     sharded=sharded)
    if scheduler.name == "asha" and scheduler.grace_period > spec.max_epochs():
        raise ConfigError(f"scheduler.grace_period={scheduler.grace_period} exceeds the trials' epochs "
                          f"({spec.max_epochs()}); ASHA could never compare trials")
    return spec
