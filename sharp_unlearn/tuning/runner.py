"""Run a validated sweep with Ray Tune: shared inputs once, trials, MLflow tree, best trial, tables.

Order of work (each step only after the previous one succeeded):

1. the spec was validated (``spec.py``) and the tracking store answers;
2. stage ``unlearn``: the pretrained checkpoint, the forget split and the
   retrained reference are computed here, once (all cached by hash), and
   shipped to every trial;
3. the parent MLflow run opens (``kind=sweep``; reopened on ``--resume``);
4. Ray starts (a local instance sized to the machine, or ``--address``),
   the Tuner runs (or is restored), Ray is shut down in ``finally``;
5. the results table, the best trial (tagged in MLflow) and the files.

An interrupted sweep (Ctrl-C, SIGTERM) stops gracefully: Ray saves the
experiment state, unfinished trials keep their last checkpoint, and
``--resume`` continues without re-running finished trials.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sharp_unlearn.config import config_from_dict, stable_hash
from sharp_unlearn.engine.runner import resolve_device
from sharp_unlearn.errors import ConfigError, handle_sigterm, note_termination, require
from sharp_unlearn.files import atomic_path, atomic_write
from sharp_unlearn.markdown import fmt_result, markdown_table
from sharp_unlearn.metrics.accuracy import split_accuracies
from sharp_unlearn.metrics.tow import tow
from sharp_unlearn.model_store import resolve_checkpoint
from sharp_unlearn.ray_cluster import ray_session
from sharp_unlearn.recipes.memorization import select_forget_set
from sharp_unlearn.recipes.pretrain import train_from_scratch
from sharp_unlearn.recipes.unlearn import get_reference, load_pretrained
from sharp_unlearn.results import rows_from_metrics, write_results
from sharp_unlearn.tracking import open_run, preflight
from sharp_unlearn.tuning.runs import mlflow_client, read_json, reopened_run, trial_tags
from sharp_unlearn.tuning.sharded import exported
from sharp_unlearn.tuning.spec import SHARDED_DRIVER_CPU, SweepSpec
from sharp_unlearn.tuning.trainables import tune_trainable
from sharp_unlearn.tuning.trial_state import TrialInputs

META_DIR = "_sharp_unlearn"
TABLE_METRICS = ("objective", "tow", "retain_acc", "forget_acc", "test_acc", "test_acc_drop", "val_acc",
                 "train_loss", "wall_seconds")


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped before every trial finished; ``--resume`` continues it."""


@dataclass
class SweepOutcome:
    name: str
    experiment_dir: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    parent_run_id: str | None
    interrupted: bool = False
    baseline_rows: list[dict[str, Any]] = field(default_factory=list)
    results_path: str | None = None
    markdown_path: str | None = None
    best_config_path: str | None = None
    columns: list[str] = field(default_factory=list)
    #: sharded sweeps: the best trial's consolidated fp32 checkpoint (next to best_config.yaml)
    best_checkpoint_path: str | None = None


# --------------------------------------------------------------------------- paths and state
def experiment_dir(spec: SweepSpec) -> Path | None:
    """The local experiment directory (None when the storage is a URI such as s3://)."""
    if "://" in spec.storage:
        return None
    return Path(spec.storage) / spec.name


def meta_dir(spec: SweepSpec) -> Path:
    directory = experiment_dir(spec)
    if directory is None:  # remote storage: keep the driver's bookkeeping locally
        return Path(spec.output_dir) / "sweeps" / spec.name / META_DIR
    return directory / META_DIR


def spec_hash(spec: SweepSpec) -> str:
    """What must not change between a sweep and its --resume (the search, the base configs, the objective)."""
    keep = {k: v for k, v in spec.raw.items() if k not in ("max_concurrent", "description")}
    return stable_hash({"raw": keep, "stage": spec.stage, "num_samples": spec.num_samples})


def _can_restore(spec: SweepSpec) -> bool:
    from ray.tune import Tuner

    path = experiment_dir(spec)
    target = str(path) if path is not None else f"{spec.storage.rstrip('/')}/{spec.name}"
    try:
        return bool(Tuner.can_restore(target))
    except Exception:  # noqa: BLE001 - an unreachable or empty location cannot be restored
        return False


# --------------------------------------------------------------------------- shared inputs
def prepare_inputs(spec: SweepSpec, *, quiet: bool = False) -> tuple[TrialInputs, dict[str, Any]]:
    """Trial inputs; stage ``unlearn`` trains (or finds cached) the pretrained model and reference here, once.

    Returns the inputs and a context dict (run ids, split, baseline metrics) for tags and tables.
    """
    inputs = TrialInputs(stage=spec.stage, dims=spec.dims, objective=spec.objective,
                         pretrain_tree=spec.pretrain_tree, unlearn_tree=spec.unlearn_tree,
                         unlearn_overrides=spec.unlearn_overrides, output_dir=spec.output_dir,
                         threads=spec.resources.threads,
                         ledger_dir=str(meta_dir(spec) / "trainings") if experiment_dir(spec) else None)
    if spec.sharded is not None:
        # the trial's own process only starts its workers and relays their reports: one thread is plenty
        inputs.threads = 1
        inputs.extra.update(sharded=True, cpus_per_worker=spec.resources.cpu)
    context: dict[str, Any] = {}
    if spec.stage != "unlearn":
        return inputs, context

    if spec.checkpoint:  # a file, runs:/<id>/model or models:/<name>/<version>
        checkpoint = resolve_checkpoint(spec.checkpoint, config_from_dict(spec.unlearn_tree).tracking.uri)
    else:
        checkpoint = train_from_scratch(config_from_dict(spec.pretrain_tree), quiet=quiet).checkpoint
    pretrained = load_pretrained(checkpoint)
    cfg = config_from_dict(spec.unlearn_tree)
    device = resolve_device(cfg.device)
    model = pretrained.model(device)
    split = select_forget_set(cfg.forget, pretrained.bundle, pretrained.cfg.seed, model=model, device=device,
                              run_cfg=pretrained.cfg)
    reference = get_reference(pretrained, split, quiet=quiet, run_cfg=cfg)
    original = split_accuracies(model, pretrained.bundle, split.forget_positions, split.retain_positions, device,
                                cfg.data.eval_batch_size)
    original["tow"] = tow(original, reference.metrics)
    inputs.pretrained_bytes = Path(checkpoint).read_bytes()
    inputs.extra["pretrained_path"] = str(Path(checkpoint).resolve())
    inputs.split = split
    inputs.reference = {"checkpoint": str(reference.checkpoint), "metrics": dict(reference.metrics),
                        "run_id": reference.run_id, "wall_seconds": reference.wall_seconds}
    inputs.original = dict(original)
    context.update(pretrain_checkpoint=str(checkpoint), pretrain_run_id=pretrained.run_id,
                   reference_checkpoint=str(reference.checkpoint), reference_run_id=reference.run_id,
                   split_hash=split.split_hash, forget_set=split.label, original=dict(original),
                   reference=dict(reference.metrics), pretrain_optimizer=pretrained.cfg.optimizer.tag)
    return inputs, context


# --------------------------------------------------------------------------- Ray pieces
def _domain(dim):
    from ray import tune

    if dim.kind == "grid":
        return tune.grid_search(list(dim.values))
    if dim.kind == "choice":
        return tune.choice(list(dim.values))
    if dim.kind == "uniform":
        return tune.uniform(dim.low, dim.high)
    if dim.kind == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    return tune.randint(dim.low, dim.high)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    return {dim.key: _domain(dim) for dim in spec.dims}


def tune_scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler.name == "fifo":
        return FIFOScheduler()
    # time axis = reported epochs; a trial that reaches max_t is done anyway
    return ASHAScheduler(time_attr="epoch", max_t=spec.max_epochs(), grace_period=spec.scheduler.grace_period,
                         reduction_factor=spec.scheduler.reduction_factor)


def tune_search_alg(spec: SweepSpec, max_concurrent: int | None = None):
    max_concurrent = max_concurrent or spec.max_concurrent
    if spec.searcher.name == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=spec.searcher.seed)
        if max_concurrent:
            return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
        return searcher
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=spec.searcher.seed, max_concurrent=max_concurrent or 0)


def sharded_concurrency(spec: SweepSpec, cluster: dict[str, float]) -> int | None:
    """How many sharded trials may run at once: as many as fit the cluster whole (capped by max_concurrent).

    Tune only reserves a sharded trial's own sliver; its workers ask for their placement
    group later. Trials started beyond what fits would each hold a sliver while their
    workers wait, and enough waiting slivers leave no room for any trial's workers
    (on 2 CPUs, two trials' 0.01 CPUs already leave less than 2 x 0.99): nothing would run.
    """
    if spec.sharded is None:
        return spec.max_concurrent
    wanted = spec.trial_resources()
    fits = min(int((float(cluster.get(kind, 0)) + 1e-9) // amount) for kind, amount in wanted.items() if amount > 0)
    fits = max(1, fits)
    return min(fits, spec.max_concurrent) if spec.max_concurrent else fits


def _what_a_trial_takes(spec: SweepSpec, kind: str = "CPU") -> str:
    key = "cpu" if kind == "CPU" else "gpu"
    per = getattr(spec.resources, key)
    if spec.sharded is None:
        return f"resources.{key}={per:g}"
    total = spec.trial_resources()[kind]
    return (f"a sharded trial ({spec.sharded.num_workers} workers x resources.{key}={per:g}"
            + (f" + {total - spec.sharded.num_workers * per:g} for the trial itself" if kind == "CPU" else "")
            + f" = {total:g} {kind}s)")


@contextlib.contextmanager
def _ray_address_for_shared_inputs(address: str | None) -> Iterator[None]:
    """A sharded pretrained model or reference, trained by the driver before the trials, runs its
    workers on the sweep's cluster (``--address``), not on a Ray instance of its own on the driver's node."""
    if not address or os.environ.get("RAY_ADDRESS"):
        yield
        return
    os.environ["RAY_ADDRESS"] = address
    try:
        yield
    finally:
        os.environ.pop("RAY_ADDRESS", None)


def _check_fit(spec: SweepSpec) -> None:
    """A trial (with its workers, when sharded) must fit the cluster it runs on, or Ray would wait forever."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    wanted = spec.trial_resources()
    if wanted["CPU"] > cpus + 1e-9:
        hint = ("lower resources.cpu (fractions such as 0.99 let N workers share N CPUs with the trial), "
                "distributed.num_workers, or use a larger cluster" if spec.sharded
                else "lower resources.cpu or use a larger cluster")
        raise ConfigError(f"{_what_a_trial_takes(spec)} exceeds the {cpus:g} CPUs Ray has; "
                          f"no trial could ever start ({hint})")
    if wanted["GPU"] > gpus + 1e-9:
        raise ConfigError(f"{_what_a_trial_takes(spec, 'GPU')} exceeds the {gpus:g} GPUs Ray has; "
                          f"no trial could ever start")


@contextlib.contextmanager
def _sigterm_stops_tune() -> Iterator[None]:
    """SIGTERM during the sweep = Ctrl-C: Ray Tune saves the experiment and stops (it listens to SIGUSR1);
    a second SIGTERM gets the handler that was there before."""
    replaced = {}

    def handler(signum, frame):
        note_termination()  # whatever Tune raises while it stops is part of the interruption
        signal.signal(signal.SIGTERM, replaced["handler"])
        os.kill(os.getpid(), signal.SIGUSR1)

    with handle_sigterm(handler) as replaced["handler"]:
        yield


# --------------------------------------------------------------------------- results
def collect_rows(spec: SweepSpec, result_grid, run_ids: dict[str, str],
                 statuses: dict[str, str]) -> list[dict[str, Any]]:
    """One row per trial; ``statuses`` (from the sweep callback) says which trials truly finished.

    (Ray marks the trials an interrupted sweep stopped TERMINATED too, so its own status cannot tell.)
    """
    rows = []
    for result in result_grid:
        metrics = dict(result.metrics or {})
        config = dict(result.config or {})
        trial_id = metrics.get("trial_id") or Path(str(result.path)).name
        epoch = int(metrics.get("epoch", 0))
        planned = int(metrics.get("epochs_planned", epoch))
        status = statuses.get(trial_id, "UNFINISHED")
        row: dict[str, Any] = {"trial_id": trial_id, "status": status, "epochs": epoch, "planned": planned,
                               "stopped_early": bool(status == "TERMINATED" and epoch < planned),
                               "diverged": bool(metrics.get("diverged")),
                               "feasible": bool(metrics.get("feasible", 1.0)),
                               "run_id": run_ids.get(trial_id),
                               "checkpoint": result.checkpoint.path if result.checkpoint else None}
        for dim in spec.dims:
            row[dim.key] = config.get(dim.key)
        for key in TABLE_METRICS:
            if key in metrics:
                row[key] = metrics[key]
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def pick_best(spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best finished trial by objective.

    Trials stopped early by ASHA report a shorter run than their config asks
    for, so the best is chosen among trials that ran all their epochs (all
    finished ones when none did); diverged trials and, with
    ``constraint_mode: filter``, infeasible ones never win.
    """
    done = [r for r in rows if r["status"] == "TERMINATED" and not r["diverged"] and "objective" in r
            and abs(r["objective"]) < 1e8]
    if spec.objective.constraint_mode == "filter":
        done = [r for r in done if r["feasible"]]
    complete = [r for r in done if not r["stopped_early"]] or done
    if not complete:
        return None
    sign = 1.0 if spec.objective.mode == "max" else -1.0
    return max(complete, key=lambda r: sign * float(r["objective"]))


BEST_CHECKPOINT = "best_checkpoint.pt"


def export_best(result_grid, best: dict[str, Any], directory: Path) -> Path | None:
    """Copy the best sharded trial's consolidated fp32 export to ``directory/best_checkpoint.pt``.

    The trial's final Tune checkpoint names the export (``tuning/sharded.py``); the
    file itself lives in the run's folder under ``output_dir`` (a shared file system
    on a cluster). None, with a warning, when it cannot be read from here.
    """
    import shutil
    import sys

    for result in result_grid:
        trial_id = (result.metrics or {}).get("trial_id") or Path(str(result.path)).name
        if trial_id != best["trial_id"]:
            continue
        with exported(result.checkpoint) as export:
            if export is None or not export.is_file():
                print(f"sharp-unlearn sweep: warning: the best trial's consolidated checkpoint "
                      f"({export or 'not recorded'}) is not readable from this machine; not copied",
                      file=sys.stderr)
                return None
            target = directory / BEST_CHECKPOINT
            with atomic_path(target) as tmp:
                shutil.copyfile(export, tmp)
            return target
    return None


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def table_columns(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[str]:
    present = [k for k in TABLE_METRICS if any(k in r for r in rows)]
    return ["trial_id", "status", "epochs", *spec.keys, *present]


def write_tables(spec: SweepSpec, rows, baseline_rows, best, directory: Path, context: dict[str, Any],
                 best_checkpoint: Path | None = None):
    """``sweep_results.parquet`` (long format, the README's "Names users query"), ``sweep_results.md``,
    ``best_config.yaml`` (naming ``best_checkpoint`` when a sharded sweep exported one)."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = config_from_dict(spec.searched_stage_tree)
    method = cfg.method.name if cfg.method is not None else "pretrain"
    forget_set = context.get("forget_set") or (cfg.forget.label if cfg.forget is not None else "")
    long_rows = []
    for row in rows:
        metrics = {k: row[k] for k in TABLE_METRICS if k in row and isinstance(row[k], (int, float))}
        long_rows += rows_from_metrics(metrics, run_id=row.get("run_id"), method=method,
                                       optimizer=str(row.get("optimizer", "")) or cfg.optimizer.tag,
                                       dataset=cfg.data.name, forget_set=forget_set, seed=cfg.seed)
    for row in baseline_rows:
        metrics = {k: row[k] for k in TABLE_METRICS if k in row and isinstance(row[k], (int, float))}
        long_rows += rows_from_metrics(metrics, run_id=row.get("run_id"), method=row["trial_id"],
                                       optimizer=context.get("pretrain_optimizer", ""), dataset=cfg.data.name,
                                       forget_set=forget_set, seed=cfg.seed)
    results_path = write_results(long_rows, directory / "sweep_results.parquet")
    columns = table_columns(spec, rows)
    shown = [{k: _fmt(v) for k, v in r.items()} for r in (*baseline_rows, *rows)]
    markdown_path = directory / "sweep_results.md"
    header = f"# sweep {spec.name}: {spec.objective.describe()}\n\n"
    atomic_write(markdown_path, header + markdown_table(columns, shown, cell=fmt_result))
    best_path = None
    if best is not None:
        params = {k: best[k] for k in spec.keys}
        pre, un = spec.trial_configs(params)
        best_cfg = un if un is not None else pre
        best_path = directory / "best_config.yaml"
        atomic_write(best_path, yaml.safe_dump({"trial_id": best["trial_id"], "objective": best["objective"],
                                                "searched": params,
                                                **({"checkpoint": str(best_checkpoint)} if best_checkpoint else {}),
                                                "config": best_cfg.to_dict(),
                                                **({"pretrain_config": pre.to_dict()} if spec.stage == "both"
                                                   else {})}, sort_keys=False))
    return results_path, markdown_path, best_path, columns


# --------------------------------------------------------------------------- the sweep
def run_sweep(spec: SweepSpec, *, address: str | None = None, resume: bool = False, num_cpus: int | None = None,
              quiet: bool = False) -> SweepOutcome:
    require("ray.tune", "tune")

    exp_dir = experiment_dir(spec)
    meta = meta_dir(spec)
    state_file = meta / "state.json"
    restorable = _can_restore(spec)
    if resume and not restorable:
        raise ConfigError(f"nothing to resume: no sweep {spec.name!r} under {spec.storage!r} "
                          f"(run it without --resume first, or pass the same --storage/--name)")
    if not resume and restorable:
        raise ConfigError(f"sweep {spec.name!r} already exists under {spec.storage!r}; pass --resume to continue "
                          f"it, or choose another --name or --storage")
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if resume and state.get("spec_hash") not in (None, spec_hash(spec)):
        raise ConfigError(f"the sweep definition changed since sweep {spec.name!r} started (search space, base "
                          f"config, objective or num_samples); resume it with the same file and options")
    if not address and not os.environ.get("RAY_ADDRESS"):
        cpus = num_cpus or os.cpu_count() or 1
        if spec.trial_resources()["CPU"] > cpus:
            raise ConfigError(f"{_what_a_trial_takes(spec)} exceeds this machine's {cpus} CPUs; "
                              f"no trial could ever start")

    base_cfg = config_from_dict(spec.searched_stage_tree)
    tracking = base_cfg.tracking.enabled
    uri = preflight(base_cfg.tracking.uri) if tracking else None
    with _ray_address_for_shared_inputs(address):
        inputs, context = prepare_inputs(spec, quiet=quiet)

    tags = {"sweep": spec.name, "stage": spec.stage, "objective": spec.objective.describe(),
            "searched_keys": ", ".join(spec.keys), "scheduler": spec.scheduler.name,
            "searcher": spec.searcher.name, "num_samples": spec.num_samples, "total_trials": spec.total_trials,
            "experiment_dir": str(exp_dir) if exp_dir else f"{spec.storage}/{spec.name}",
            **{k: context.get(k) for k in ("pretrain_run_id", "reference_run_id", "split_hash", "forget_set",
                                           "pretrain_optimizer")}}
    pre_base, un_base = spec.trial_configs({})
    tags.update(trial_tags(spec.stage, pre_base, un_base))
    parent_id = state.get("parent_run_id") if resume else None
    if parent_id and tracking:
        parent_cm = reopened_run(uri, parent_id)
    else:
        parent_cm = open_run(base_cfg, kind="sweep", tags=tags, run_name=f"sweep-{spec.name}")

    if not resume and meta.is_dir():  # left by an earlier attempt that never reached Ray: start clean
        import shutil

        shutil.rmtree(meta)
    meta.mkdir(parents=True, exist_ok=True)
    with parent_cm as parent:
        parent_id = parent.run_id
        state = {"parent_run_id": parent_id, "spec_hash": spec_hash(spec), "source": spec.source,
                 "tracking_uri": uri}
        atomic_write(state_file, json.dumps(state, indent=1))
        if not resume:
            parent.log_text(yaml.safe_dump(spec.raw, sort_keys=False), "sweep.yaml")
        # trial output stays in each trial's log (Ray prints the path of a failed trial's error file);
        # sharded trials are Ray Train runs, whose placement groups are released through the state API
        with ray_session(address=address, num_cpus=num_cpus, state_api=spec.sharded is not None, log_to_driver=False,
                         logging_level=logging.WARNING if quiet else logging.INFO):
            _check_fit(spec)
            result_grid = fit_tuner(spec, inputs, resume=resume, quiet=quiet, parent_id=parent_id, uri=uri,
                                    experiment_id=getattr(parent, "experiment_id", None), context=context,
                                    map_file=meta / "mlflow_runs.json")
        run_ids = read_json(meta / "mlflow_runs.json")
        rows = collect_rows(spec, result_grid, run_ids, read_json(meta / "trial_status.json"))
        interrupted = any(r["status"] not in ("TERMINATED", "ERROR") for r in rows) or \
            len(rows) < spec.total_trials
        best = None if interrupted else pick_best(spec, rows)
        baseline = []
        if context.get("original"):
            baseline = [{"trial_id": "original", "status": "-", "epochs": 0, **context["original"],
                         "run_id": context.get("pretrain_run_id")},
                        {"trial_id": "retrain", "status": "-", "epochs": 0, **context["reference"], "tow": 1.0,
                         "run_id": context.get("reference_run_id")}]
        out_dir = exp_dir if exp_dir is not None else meta.parent
        best_checkpoint = None
        if best is not None and spec.sharded is not None:
            best_checkpoint = export_best(result_grid, best, out_dir)
        results_path, markdown_path, best_path, columns = write_tables(spec, rows, baseline, best, out_dir, context,
                                                                       best_checkpoint)
        if tracking:
            _log_outcome(parent, spec, rows, best, run_ids, results_path, markdown_path, best_path, uri)
        outcome = SweepOutcome(spec.name, str(out_dir), rows, best, parent_id, interrupted, baseline,
                               str(results_path), str(markdown_path), str(best_path) if best_path else None,
                               columns, str(best_checkpoint) if best_checkpoint else None)
        if interrupted:
            # the table so far is on disk; the parent run ends KILLED and the CLI exits 130
            exc = SweepInterrupted(f"sweep {spec.name!r} stopped with {sum(r['status'] == 'TERMINATED' for r in rows)}"
                                   f" of {spec.total_trials} trials finished")
            exc.outcome = outcome
            raise exc
    return outcome


def fit_tuner(spec: SweepSpec, inputs: TrialInputs, *, resume: bool, quiet: bool, parent_id: str | None,
              uri: str | None, experiment_id: str | None, context: dict[str, Any], map_file: Path):
    from ray import tune

    # one checkpoint per epoch per trial is the point here; Ray's warning about frequent snapshots is noise
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    concurrency = None
    if spec.sharded is None:
        resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    else:  # the trial only drives its Train run; the workers get resources.* each, in their own placement group
        resources = {"cpu": SHARDED_DRIVER_CPU}
        import ray

        concurrency = sharded_concurrency(spec, ray.cluster_resources())
    trainable = tune.with_resources(tune.with_parameters(tune_trainable, inputs=inputs), resources)
    with _sigterm_stops_tune():
        if resume:
            path = experiment_dir(spec)
            tuner = tune.Tuner.restore(str(path) if path else f"{spec.storage.rstrip('/')}/{spec.name}",
                                       trainable=trainable, resume_unfinished=True, resume_errored=True)
            return tuner.fit()
        # lazy: tuning.callback subclasses ray.tune.Callback, so importing it imports ray
        from sharp_unlearn.tuning.callback import TrialRuns

        callbacks = [TrialRuns(status_file=str(map_file.with_name("trial_status.json")), uri=uri,
                               experiment_id=experiment_id, parent_run_id=parent_id, map_file=str(map_file),
                               sweep=spec.name, stage=spec.stage, dims=spec.dims, pretrain_tree=spec.pretrain_tree,
                               unlearn_tree=spec.unlearn_tree, unlearn_overrides=spec.unlearn_overrides,
                               common_tags={k: context.get(k) for k in
                                            ("split_hash", "pretrain_run_id", "reference_run_id")})]
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(metric="objective", mode=spec.objective.mode, scheduler=tune_scheduler(spec),
                                        search_alg=tune_search_alg(spec, concurrency), num_samples=spec.num_samples,
                                        # a stopped sharded trial's process must end: its Train run (and
                                        # the workers' placement group) ends with it
                                        reuse_actors=spec.sharded is None,
                                        time_budget_s=spec.time_budget_s),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=spec.storage, callbacks=callbacks, verbose=0 if quiet else 1,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.keep_checkpoints)),
        )
        return tuner.fit()


def _log_outcome(parent, spec: SweepSpec, rows, best, run_ids, results_path, markdown_path, best_path,
                 uri) -> None:
    """Best trial tagged on its child run; best config and metric on the parent; tables as artifacts."""
    parent.log_artifact(results_path, "sweep")
    parent.log_artifact(markdown_path, "sweep")
    finished = sum(r["status"] == "TERMINATED" for r in rows)
    parent.set_tags({"trials_finished": finished, "trials_stopped_early": sum(r["stopped_early"] for r in rows),
                     "trials_failed": sum(r["status"] == "ERROR" for r in rows)})
    if best is None:
        return
    parent.log_artifact(best_path, "sweep")
    parent.set_tags({"best_trial_id": best["trial_id"], "best_run_id": best.get("run_id"),
                     **{f"best.{k}": best[k] for k in spec.keys}})
    parent.log_metrics({f"best_{k}": best[k] for k in TABLE_METRICS
                        if k in best and isinstance(best[k], (int, float))})
    if best.get("run_id"):
        mlflow_client(uri).set_tag(best["run_id"], "best_trial", "true")
