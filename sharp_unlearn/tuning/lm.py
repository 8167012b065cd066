"""Sweeps over the language-model task (``task: lm``): each Ray Tune trial runs one unlearning
method of :mod:`sharp_unlearn.recipes.lm` from a shared pretrained model and reports, every epoch,
the ToW-style gap and forget quality against the shared retrained reference.

File shape (``tuning/lm_sharp_minmax.yaml``)::

    task: lm
    lm: {subjects: 40, unlearn_epochs: 5}          # LM demo settings (the demo's key=value names)
    optimizer: adamw                                # the unlearning base optimizer: adamw, sam or asam
    method: {name: sharp_minmax, alpha: 0.5, mask_fraction: 0.5, lr: 3e-4}
    search: {method.alpha: {uniform: [0.3, 0.9]}, lm.rho: {loguniform: [0.01, 0.2]}}
    objective: {metric: forget_quality, constraints: ["model_utility >= 0.2"]}
    scheduler, searcher, num_samples, max_concurrent, resources, output_dir, storage  (as for images)

Search keys are ``method.<key>`` (the method section: alpha, mask_fraction, the method's own
settings such as rho_max / lamb_max, and ``lr``) or ``lm.<key>`` among :data:`SEARCHABLE_SETTINGS`
(what changes the unlearning run only; every trial shares one pretrained model and reference).

The sweep's driver pretrains and retrains once, writes both models under
``<output_dir>/lm_sweeps/<name>/`` and trials load them. Trials keep no checkpoints (a retried
trial unlearns again from the pretrained weights; it takes seconds) and are not logged to MLflow;
the results go to ``results.json`` and ``results.md`` in that directory.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sharp_unlearn.config import ExperimentConfig, MethodConfig, apply_overrides, load_yaml
from sharp_unlearn.engine.determinism import apply_determinism
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.files import atomic_path, atomic_write
from sharp_unlearn.markdown import fmt_result, markdown_table
from sharp_unlearn.methods import METHODS
from sharp_unlearn.metrics.lm_unlearning import against_reference, evaluate_lm
from sharp_unlearn.optim.factory import sam_spec
from sharp_unlearn.ray_cluster import ray_session
from sharp_unlearn.recipes.lm import LMDemoSettings, build_setup, optimizer_config, train_lm, unlearn_lm
from sharp_unlearn.tuning.runner import param_space, tune_scheduler, tune_search_alg
from sharp_unlearn.tuning.spec import (
    Dimension,
    Objective,
    ReportedMetrics,
    Resources,
    SchedulerSpec,
    SearcherSpec,
    int_setting,
    mapping_setting,
    parse_distribution,
    parse_objective,
    parse_resources,
    parse_scheduler,
    parse_searcher,
)

LM_TOP_LEVEL_KEYS = ("task", "name", "description", "lm", "optimizer", "method", "search", "objective",
                     "scheduler", "searcher", "num_samples", "max_concurrent", "resources", "output_dir", "storage")
#: LM demo settings a trial may change: the unlearning run's own (the pretrained model is shared)
SEARCHABLE_SETTINGS = ("unlearn_lr", "unlearn_epochs", "rho", "batch_size")
#: what an LM trial reports every epoch (against the retrained reference where it compares)
LM_METRICS = ("forget_quality", "model_utility", "tow", "forget_gap", "forget_rouge_l", "retain_rouge_l",
              "mia_auc_loss", "mia_auc_zlib", "mia_auc_mink")
LM_REPORTED = ReportedMetrics(LM_METRICS, default="forget_quality", lower_is_better=("forget_gap", "forget_rouge_l"),
                              what="LM")
LM_OPTIMIZERS = ("adamw", "sam", "asam")


@dataclass
class LMSweepSpec:
    name: str
    settings: LMDemoSettings
    optimizer: str
    method: dict[str, Any]
    dims: list[Dimension]
    objective: Objective
    scheduler: SchedulerSpec
    searcher: SearcherSpec
    num_samples: int
    resources: Resources
    output_dir: str
    storage: str
    max_concurrent: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dims]

    @property
    def total_trials(self) -> int:
        return self.num_samples * math.prod(d.size for d in self.dims)

    @property
    def work_dir(self) -> Path:
        return Path(self.output_dir) / "lm_sweeps" / self.name

    def max_epochs(self) -> int:
        epochs = [self.settings.unlearn_epochs]
        for dim in self.dims:
            if dim.path == ("lm", "unlearn_epochs"):
                epochs += [int(v) for v in dim.candidates()]
        return max(epochs)

    def trial_run(self, params: dict[str, Any]) -> tuple[LMDemoSettings, dict[str, Any]]:
        """The trial's LM settings and method section (name included) with its sampled values."""
        settings = asdict(self.settings)
        method = copy.deepcopy(self.method)
        for dim in self.dims:
            if dim.key in params:
                (settings if dim.path[0] == "lm" else method)[dim.path[1]] = params[dim.key]
        return LMDemoSettings(**settings), method


def is_lm_sweep(raw: dict[str, Any]) -> bool:
    return isinstance(raw, dict) and raw.get("task") == "lm"


def _check_trial(settings: dict[str, Any], method: dict[str, Any], optimizer: str) -> None:
    """Build what a trial builds from these values (settings, method and its own params) or raise ConfigError."""
    try:
        LMDemoSettings(**settings)
    except TypeError as exc:
        raise ConfigError(f"lm: {exc}; expected keys among {sorted(f.name for f in fields(LMDemoSettings))}") from None
    name = method.get("name")
    if name not in METHODS.names():
        raise ConfigError(f"method.name={name!r}; expected one of {METHODS.names()}")
    options = {k: v for k, v in method.items() if k not in ("name", "lr")}
    cls = METHODS.get(name)
    declared = {f.name for f in fields(cls.params_class)} if cls.params_class is not None else set()
    shared = {f.name for f in fields(MethodConfig)} - {MethodConfig.open_params_field, "epochs", "name"}
    unknown = sorted(set(options) - declared - shared)
    if unknown:
        raise ConfigError(f"method.{unknown[0]} is not a setting of {name!r}; expected one of "
                          f"{sorted(declared | shared | {'lr'})}")
    lr = method.get("lr", settings.get("unlearn_lr", LMDemoSettings.unlearn_lr))
    opt = optimizer_config(optimizer, float(lr), float(settings.get("rho", LMDemoSettings.rho)))
    cls(MethodConfig(name=name, epochs=int(settings.get("unlearn_epochs", 1)), **options), opt, sam_spec(opt))


def parse_lm_sweep(raw: dict[str, Any], *, num_samples: int | None = None,
                   max_concurrent: int | None = None, storage: str | None = None, name: str | None = None,
                   default_name: str = "lm_sweep") -> LMSweepSpec:
    """Validate a ``task: lm`` sweep definition (no Ray involved); keyword arguments win over the file."""
    unknown = sorted(set(raw) - set(LM_TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in the LM sweep file; expected one of: "
                          f"{', '.join(LM_TOP_LEVEL_KEYS)}")
    name = str(name or raw.get("name") or default_name)
    settings = dict(mapping_setting(raw.get("lm"), "lm"))
    optimizer = str(raw.get("optimizer", "adamw"))
    if optimizer not in LM_OPTIMIZERS:
        raise ConfigError(f"optimizer={optimizer!r}; expected one of {', '.join(LM_OPTIMIZERS)}")
    method = dict(mapping_setting(raw.get("method"), "method", "name"))
    if "name" not in method:
        raise ConfigError("an LM sweep needs `method: {name: sharp_minmax, ...}`")
    _check_trial(settings, method, optimizer)
    space = raw.get("search")
    if not isinstance(space, dict) or not space:
        raise ConfigError("the sweep has no search space; expected `search:` mapping keys such as method.alpha "
                          "to distributions, e.g. {uniform: [0.3, 0.9]}")
    searcher = parse_searcher(raw.get("searcher"))
    dims = []
    for key, distribution in space.items():
        parts = str(key).split(".")
        if len(parts) != 2 or parts[0] not in ("lm", "method") or parts[1] == "name":
            raise ConfigError(f"search key {key!r}; expected method.<setting> or lm.<one of "
                              f"{', '.join(SEARCHABLE_SETTINGS)}>")
        if parts[0] == "lm" and parts[1] not in SEARCHABLE_SETTINGS:
            raise ConfigError(f"search key {key!r}: every trial shares one pretrained model, so only "
                              f"lm.{{{', '.join(SEARCHABLE_SETTINGS)}}} can be searched")
        dim = parse_distribution(Dimension(str(key), "lm", tuple(parts), ""), distribution,
                                 searcher.name == "optuna")
        for value in dim.candidates():
            trial_settings, trial_method = dict(settings), dict(method)
            (trial_settings if parts[0] == "lm" else trial_method)[parts[1]] = value
            try:
                _check_trial(trial_settings, trial_method, optimizer)
            except ConfigError as exc:
                raise ConfigError(f"search space {key!r}: value {value!r} is invalid: {exc}") from None
        dims.append(dim)
    objective = parse_objective(raw.get("objective"), "lm", LM_REPORTED)
    scheduler = parse_scheduler(raw.get("scheduler"))
    samples = int_setting(num_samples if num_samples is not None else raw.get("num_samples", 1), "num_samples", 1)
    concurrent = max_concurrent if max_concurrent is not None else raw.get("max_concurrent")
    if concurrent is not None:
        concurrent = int_setting(concurrent, "max_concurrent", 1)
    output_dir = str(Path(str(raw.get("output_dir") or "runs")).expanduser().resolve())
    storage = storage or raw.get("storage")
    if storage and "://" not in str(storage):
        storage = str(Path(str(storage)).expanduser().resolve())
    spec = LMSweepSpec(name=name, settings=LMDemoSettings(**settings), optimizer=optimizer, method=method,
                       dims=dims, objective=objective, scheduler=scheduler, searcher=searcher, num_samples=samples,
                       resources=parse_resources(raw.get("resources")), output_dir=output_dir,
                       storage=storage or str(Path(output_dir) / "sweeps"), max_concurrent=concurrent,
                       raw=copy.deepcopy(raw))
    if scheduler.name == "asha" and scheduler.grace_period > spec.max_epochs():
        raise ConfigError(f"scheduler.grace_period={scheduler.grace_period} exceeds the trials' epochs "
                          f"({spec.max_epochs()}); ASHA could never compare trials")
    return spec


# --------------------------------------------------------------------------- what the trials share
@dataclass
class LMTrialInputs:
    """Everything a trial needs besides its sampled values (sent to every trial once)."""

    spec: LMSweepSpec
    pretrained_path: str
    reference_metrics: dict[str, float]
    reference_ratios: list[float]
    threads: int


def prepare_lm_inputs(spec: LMSweepSpec, log=print) -> LMTrialInputs:
    """Pretrain and retrain once (every trial starts from the same model and compares with the same one)."""
    settings = spec.settings
    apply_determinism(ExperimentConfig(threads=settings.threads))
    torch.manual_seed(settings.seed)
    setup = build_setup(settings)
    adamw = optimizer_config("adamw", settings.pretrain_lr, settings.rho)
    pretrained = train_lm(copy.deepcopy(setup.initial), setup.train, epochs=settings.pretrain_epochs,
                          optimizer=adamw, batch_size=settings.batch_size, seed=settings.seed)
    reference = train_lm(copy.deepcopy(setup.initial), setup.retain, epochs=settings.pretrain_epochs,
                         optimizer=adamw, batch_size=settings.batch_size, seed=settings.seed)
    metrics, ratios = evaluate_lm(reference, setup.tokenizer, setup.eval_splits, settings.max_length)
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    path = spec.work_dir / "pretrained.pt"
    with atomic_path(path) as tmp:
        torch.save(pretrained.state_dict(), tmp)
    log(f"lm sweep {spec.name}: pretrained and retrained once ({path})")
    return LMTrialInputs(spec, str(path), metrics, [float(r) for r in ratios], spec.resources.threads)


def lm_trial(inputs: LMTrialInputs, params: dict[str, Any], report) -> dict[str, float]:
    """One trial: unlearn from the shared pretrained weights, ``report(metrics)`` after every epoch."""
    torch.set_num_threads(inputs.threads)
    settings, method = inputs.spec.trial_run(params)
    setup = build_setup(settings)
    model = copy.deepcopy(setup.initial)
    model.load_state_dict(torch.load(inputs.pretrained_path, map_location="cpu", weights_only=True))
    reference_ratios = np.asarray(inputs.reference_ratios)
    objective = inputs.spec.objective
    last: dict[str, float] = {}

    def on_epoch_end(epoch: int, unlearned) -> None:
        metrics, ratios = evaluate_lm(unlearned, setup.tokenizer, setup.eval_splits, settings.max_length)
        metrics.update(against_reference(metrics, ratios, inputs.reference_metrics, reference_ratios))
        row = {k: float(metrics[k]) for k in LM_METRICS if k in metrics}
        row.update(objective.score(row))
        row.update(epoch=epoch, epochs_planned=settings.unlearn_epochs)
        last.clear()
        last.update(row)
        report(row)

    options = {k: v for k, v in method.items() if k not in ("name", "lr")}
    lr = float(method.get("lr", settings.unlearn_lr))
    optimizer = optimizer_config(inputs.spec.optimizer, lr, settings.rho)
    unlearn_lm(model, setup, method["name"], options, optimizer=optimizer,
               epochs=settings.unlearn_epochs, batch_size=settings.batch_size, seed=settings.seed,
               on_epoch_end=on_epoch_end)
    return last


def lm_tune_trainable(config: dict[str, Any], inputs: LMTrialInputs) -> None:
    """The function Ray Tune runs for each LM trial."""
    # ray is optional (the `tune` extra) and already imported in a Tune worker
    from ray import tune

    lm_trial(inputs, {key: config[key] for key in inputs.spec.keys if key in config}, tune.report)


# --------------------------------------------------------------------------- the sweep
@dataclass
class LMSweepOutcome:
    name: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    results_path: str
    markdown_path: str


def run_lm_sweep(spec: LMSweepSpec, *, address: str | None = None, num_cpus: int | None = None,
                 quiet: bool = False) -> LMSweepOutcome:
    """Pretrain once, then the trials on Ray Tune (ASHA on the reported epochs); tables of the trials."""
    log = (lambda *_: None) if quiet else print
    inputs = prepare_lm_inputs(spec, log)
    with ray_session(address=address, num_cpus=num_cpus):
        # ray is the optional `tune` extra: imported once a session is open
        from ray import tune

        trainable = tune.with_resources(tune.with_parameters(lm_tune_trainable, inputs=inputs),
                                        {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu})
        tuner = tune.Tuner(
            trainable, param_space=param_space(spec),
            tune_config=tune.TuneConfig(metric="objective", mode=spec.objective.mode, scheduler=tune_scheduler(spec),
                                        search_alg=tune_search_alg(spec), num_samples=spec.num_samples),
            run_config=tune.RunConfig(name=spec.name, storage_path=spec.storage, verbose=0 if quiet else 1))
        grid = tuner.fit()
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        row = {"trial_id": metrics.get("trial_id") or Path(str(result.path)).name,
               "epochs": int(metrics.get("epoch", 0)), "planned": int(metrics.get("epochs_planned", 0)),
               "error": str(result.error) if result.error else None,
               **{dim.key: (result.config or {}).get(dim.key) for dim in spec.dims},
               **{k: metrics[k] for k in ("objective", "feasible", *LM_METRICS) if k in metrics}}
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    complete = [r for r in rows if r["error"] is None and "objective" in r and r["epochs"] == r["planned"]]
    sign = 1.0 if spec.objective.mode == "max" else -1.0
    best = max(complete, key=lambda r: sign * float(r["objective"])) if complete else None
    results_path = atomic_write(spec.work_dir / "results.json", json.dumps(
        {"name": spec.name, "objective": spec.objective.describe(), "rows": rows, "best": best}, indent=2, default=str))
    columns = ["trial_id", *spec.keys, "epochs", "objective", *LM_METRICS[:4]]
    markdown_path = atomic_write(spec.work_dir / "results.md", markdown_table(columns, rows, cell=fmt_result))
    return LMSweepOutcome(spec.name, rows, best, str(results_path), str(markdown_path))


def load_lm_sweep(path: str | Path, overrides: Sequence[str] = (), *, num_samples: int | None = None,
                  max_concurrent: int | None = None, storage: str | None = None,
                  name: str | None = None) -> LMSweepSpec:
    """Read and validate a ``task: lm`` sweep file (plus ``key=value`` overrides of it); no Ray involved."""
    raw = apply_overrides(load_yaml(path), overrides)
    if not is_lm_sweep(raw):
        raise ConfigError(f"{path}: task={raw.get('task')!r}; an LM sweep file says task: lm")
    return parse_lm_sweep(raw, num_samples=num_samples, max_concurrent=max_concurrent, storage=storage,
                          name=name, default_name=Path(str(path)).stem)
