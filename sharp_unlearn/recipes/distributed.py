"""Sharded (DeepSpeed ZeRO) pretraining on N workers, launched by Ray Train or torchrun.

``sharp-unlearn pretrain ... distributed.backend=deepspeed distributed.zero_stage=3
distributed.num_workers=N`` lands in :func:`launch_deepspeed`, which

1. validates everything that can be wrong before any process starts
   (:func:`validate_launch`: ZeRO stage, the DeepSpeed JSON against the run
   config, workers against the CPUs/GPUs of this machine or Ray cluster);
2. reuses a completed export with the same hashes (the retrain-reference cache);
3. starts N workers: Ray Train's ``TorchTrainer`` (``distributed.launcher=ray``,
   local Ray or ``distributed.address``/``RAY_ADDRESS``) or ``torchrun`` on this
   machine (``distributed.launcher=torchrun``);
4. returns the same :class:`~sharp_unlearn.recipes.stages.TrainOutcome` as
   single-device pretraining, pointing at a consolidated fp32 checkpoint that
   ``evaluate``/``unlearn`` load on one device.

Every worker runs :func:`run_worker` (Ray calls it through
:func:`train_loop_per_worker`; torchrun/deepspeed launchers through
``python -m sharp_unlearn.recipes.distributed worker ...``). Rank 0 alone
logs to MLflow (``open_run`` checks ``RANK``).

Faults: a worker that dies makes the launcher stop the others (torchrun on
one node within seconds; Ray Train fails the run with ``max_failures=0``);
across nodes, or when a worker hangs, the others fail at their next
collective after ``distributed.timeout_s`` (set on every process group,
DeepSpeed's included). The run exits 1 naming the sharded checkpoint;
rerunning the same command resumes from it.

Ray Tune (Ray 2.60 runs Train V2, where ``Tuner(TorchTrainer)`` is refused):
a function trainable builds :func:`build_torch_trainer` with
``run_config=RunConfig(callbacks=[TuneReportCallback()])`` and calls
``fit()``; each epoch's record is reported with ``ray.train.report``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sharp_unlearn.config import ExperimentConfig, stable_hash
from sharp_unlearn.data import build_dataset
from sharp_unlearn.data.forget import ForgetSplit
from sharp_unlearn.engine.checkpoint import load_checkpoint, load_model_state
from sharp_unlearn.engine.deepspeed_backend import DeepSpeedBackend, read_progress
from sharp_unlearn.engine.deepspeed_config import (
    check_worker_resources,
    local_resources,
    resolve_deepspeed_config,
    validate_distributed,
)
from sharp_unlearn.engine.deepspeed_engine import barrier, init_distributed
from sharp_unlearn.errors import ConfigError, require
from sharp_unlearn.files import atomic_write
from sharp_unlearn.methods import METHODS
from sharp_unlearn.models import build_model
from sharp_unlearn.optim.factory import sam_spec
from sharp_unlearn.ray_cluster import ray_session, resolve_address
from sharp_unlearn.recipes.stages import (
    TrainOutcome,
    epoch_evaluator,
    load_pretrained,
    stage_meta,
    train_stage,
    unlearn_stage,
)
from sharp_unlearn.stage_checkpoints import stage_dir
from sharp_unlearn.tracking import preflight, resolve_uri
from sharp_unlearn.validation import config_from_dict, load_config

OUTCOME_FILE = "outcome.json"


# ---------------------------------------------------------------- names and hashes
def distributed_config_hash(cfg: ExperimentConfig) -> str:
    """What determines a sharded run's result: the training recipe and the global batch
    (``num_workers`` multiplies ``data.batch_size``); the ZeRO stage does not change it."""
    return stable_hash({"training": cfg.training_hash(), "num_workers": cfg.distributed.num_workers})


def distributed_stage_dir(cfg: ExperimentConfig, kind: str, split_hash: str | None = None) -> Path:
    base = stage_dir(cfg, kind, split_hash)
    # sharded checkpoints only load into the same stage and world size
    return base.with_name(f"{base.name}-zero{cfg.distributed.zero_stage}x{cfg.distributed.num_workers}")


def _absolute(cfg: ExperimentConfig) -> ExperimentConfig:
    """Workers may run in another directory (Ray): pin relative paths and the tracking URI."""
    tree = cfg.to_dict()
    tree["output_dir"] = str(Path(cfg.output_dir).resolve())
    if cfg.data.root:
        tree["data"]["root"] = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.distributed.deepspeed_config:
        tree["distributed"]["deepspeed_config"] = str(Path(cfg.distributed.deepspeed_config).resolve())
    if cfg.tracking.enabled:
        uri = resolve_uri(cfg.tracking.uri)
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
        # the driver creates a fresh store (and checks a server) before any worker starts: workers racing
        # to create one SQLite database would fail, and a bad server should stop us before the workers
        preflight(uri, cfg.tracking.experiment)
        tree["tracking"]["uri"] = uri
    return config_from_dict(tree)


# ---------------------------------------------------------------- validation
def validate_launch(cfg: ExperimentConfig, address: str | None = None) -> dict[str, Any]:
    """Every check that needs no worker; returns the resolved DeepSpeed config.

    Worker counts are checked against this machine here; against a remote Ray
    cluster (``address``) after connecting, still before any worker starts.
    """
    launcher = cfg.distributed.launcher
    address = address or cfg.distributed.address
    if launcher == "torchrun" and address:
        raise ConfigError(f"distributed.address={address!r} needs distributed.launcher=ray "
                          "(torchrun starts workers on this machine only)")
    remote = launcher == "ray" and bool(address)
    # a remote cluster's resources are checked after connecting (launch_ray)
    return validate_distributed(cfg, available={"CPU": 10**9, "GPU": 10**9} if remote else None)


# ---------------------------------------------------------------- worker side
def _join(spec: Mapping[str, Any]):
    """Join the process group as one rank of the run in ``spec``; returns (cfg, out_dir, device, rank)."""
    cfg = config_from_dict(spec["cfg"])
    out_dir = Path(spec["out_dir"])
    _stdout_to_stderr()  # DeepSpeed prints to stdout; the driver's stdout may be --json
    device = init_distributed(cfg)
    rank = torch.distributed.get_rank()
    (out_dir / "launch").mkdir(parents=True, exist_ok=True)
    # which process is which rank: for operators (and the fault test) to find a worker
    (out_dir / "launch" / f"rank{rank}.pid").write_text(str(os.getpid()))
    return cfg, out_dir, device, rank


def _backend(cfg: ExperimentConfig, device, out_dir: Path, export_path: Path):
    return DeepSpeedBackend(resolve_deepspeed_config(cfg), device, out_dir / "deepspeed", export_path,
                            timeout_s=cfg.distributed.timeout_s)


def _finish(backend, out_dir: Path, outcome: dict[str, Any] | None) -> dict[str, Any] | None:
    """Rank 0 leaves the outcome for the launcher; every rank releases the engine together."""
    if outcome is not None:
        atomic_write(out_dir / OUTCOME_FILE, json.dumps(outcome, indent=1, default=float))
    backend.engine.destroy()
    barrier()
    return outcome


def run_worker(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """One rank of a sharded pretraining run (all ranks call this; rank 0 returns the outcome).

    The single-device recipe (:func:`~sharp_unlearn.recipes.stages.train_stage`) on the
    DeepSpeed backend; rank 0 alone logs to MLflow (``open_run`` checks ``RANK``).
    """
    if spec.get("kind") == "unlearn":
        return run_unlearn_worker(spec)
    cfg, out_dir, device, rank = _join(spec)
    kind = spec.get("kind", "pretrain")
    bundle = build_dataset(cfg.data, cfg.seed)
    split_hash = spec.get("split_hash")
    meta = {**stage_meta(cfg, bundle, kind, split_hash, distributed_config_hash(cfg)),
            "distributed": {"zero_stage": cfg.distributed.zero_stage, "num_workers": cfg.distributed.num_workers}}
    ckpt_path = out_dir / "checkpoint.pt"
    backend = _backend(cfg, device, out_dir, ckpt_path)
    tags = {"distributed": f"deepspeed-zero{cfg.distributed.zero_stage}x{cfg.distributed.num_workers}",
            **(spec.get("tags") or {})}
    result = train_stage(cfg, bundle, backend, out_dir=out_dir, checkpoint_path=ckpt_path, meta=meta,
                         train_indices=spec.get("train_indices"), split_hash=split_hash, kind=kind, tags=tags,
                         quiet=bool(spec.get("quiet")), resume=bool(spec.get("resume", True)),
                         epoch_callback=_epoch_reporter(spec),
                         build_context=backend.model_construction(cfg.model))
    outcome = None
    if rank == 0:
        outcome = {"checkpoint": str(ckpt_path), "metrics": result.metrics, "run_id": result.run_id,
                   "wall_seconds": result.wall_seconds, "history": result.history,
                   "resumed_from": result.resumed_from}
    return _finish(backend, out_dir, outcome)


def run_unlearn_worker(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """One rank of a sharded unlearning stage (spec from :func:`make_unlearn_spec`).

    The driver (``run_unlearning``) selected the split, trained the reference and
    keeps measuring the final model; each rank rebuilds the pretrained model and the
    *same* split from the positions in the spec (never reselecting) and runs the
    single-device recipe's stage (:func:`~sharp_unlearn.recipes.stages.unlearn_stage`)
    on the DeepSpeed backend; rank 0 exports the consolidated fp32 weights.
    """
    cfg, out_dir, device, rank = _join(spec)
    pretrained = load_pretrained(spec["checkpoint"])
    bundle = pretrained.bundle
    s = spec["split"]
    split = ForgetSplit(np.asarray(s["forget_positions"], dtype=np.int64),
                        np.asarray(s["retain_positions"], dtype=np.int64),
                        np.asarray(s["forget_indices"], dtype=np.int64),
                        np.asarray(s["retain_indices"], dtype=np.int64), s["split_hash"], s["label"],
                        None if s["scores"] is None else np.asarray(s["scores"], dtype=np.float64))
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
    load_model_state(model, pretrained.state["model"], f"checkpoint {spec['checkpoint']!r}")
    method = METHODS.get(cfg.method.name)(cfg.method, cfg.optimizer, sam_spec(cfg.optimizer))
    # with the reference's accuracies (the driver holds them) every epoch is measured as a single
    # process measures it (ToW etc.), on the sharded model: the backend's eval model splits the rows
    evaluate = None
    if spec.get("reference_metrics") is not None:
        evaluate = epoch_evaluator(bundle, split, dict(spec["reference_metrics"]), device, cfg.data.eval_batch_size)
    export_path = out_dir / "unlearned_fp32.pt"
    backend = _backend(cfg, device, out_dir, export_path)
    # the driver holds the MLflow run; workers log nothing (it logs the history afterwards)
    result = unlearn_stage(cfg, model, bundle, split, method, backend,
                           checkpoint_meta=unlearn_export_meta(spec, cfg, bundle, split, method, pretrained),
                           evaluate=evaluate, quiet=bool(spec.get("quiet")), resume=bool(spec.get("resume", True)),
                           on_epoch_end=_epoch_reporter(spec))
    outcome = None
    if rank == 0:
        outcome = {"checkpoint": str(export_path), "wall_seconds": result.wall_seconds,
                   "history": result.history, "resumed_from": result.resumed_from}
    return _finish(backend, out_dir, outcome)


def unlearn_export_meta(spec: Mapping[str, Any], cfg: ExperimentConfig, bundle, split, method,
                        pretrained) -> dict[str, Any]:
    """What a sharded unlearning export records besides its weights: the same as a single-process
    unlearning checkpoint, so ``sharp-unlearn evaluate`` rebuilds its forget set and finds its retrained
    reference (a sweep's ``best_checkpoint.pt`` is such an export)."""
    meta = {"config_hash": spec["config_hash"], "kind": "unlearn", "split_hash": split.split_hash,
            "model_name": cfg.model.name, "dataset": cfg.data.name, "method": cfg.method.name,
            "optimizer_tag": method.optimizer_tag, "num_classes": bundle.num_classes,
            "input_shape": list(bundle.input_shape), "forget_label": split.label,
            "forget_indices": [int(i) for i in split.forget_indices],
            "forget_positions": [int(i) for i in split.forget_positions],
            "pretrain_checkpoint": spec["checkpoint"], "pretrain_config": pretrained.state.get("config")}
    if spec.get("reference_checkpoint"):
        meta["reference_checkpoint"] = spec["reference_checkpoint"]
    return meta


def _epoch_reporter(spec: Mapping[str, Any]):
    """``on_epoch_end`` of a worker under Ray Train (``spec["report"] == "ray"``): ``ray.train.report``
    of the epoch's record, on every worker (each must call report the same number of times)."""
    if spec.get("report") != "ray":
        return None
    from ray import train as ray_train

    def on_epoch_end(epoch: int, record: dict[str, float]) -> None:
        ray_train.report({k: float(v) for k, v in record.items()})

    return on_epoch_end


def _stdout_to_stderr() -> None:
    try:
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no real descriptors: Python level only
        pass
    sys.stdout = sys.stderr


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's per-worker function: ``config`` is a spec from :func:`make_spec`."""
    return run_worker(config)


# ---------------------------------------------------------------- launch side
def make_spec(cfg: ExperimentConfig, *, kind: str = "pretrain", train_indices=None, split_hash: str | None = None,
              tags: Mapping[str, Any] | None = None, quiet: bool = False, resume: bool = True,
              report: str | None = None) -> dict[str, Any]:
    """Everything a worker needs, as plain data (Ray ships it; torchrun reads it from JSON)."""
    cfg = _absolute(cfg)
    return {
        "cfg": cfg.to_dict(), "kind": kind, "split_hash": split_hash,
        "train_indices": None if train_indices is None else [int(i) for i in np.asarray(train_indices)],
        "tags": dict(tags or {}), "quiet": quiet, "resume": resume, "report": report,
        "out_dir": str(distributed_stage_dir(cfg, kind, split_hash)),
    }


def build_torch_trainer(spec: dict[str, Any], run_config=None, cpus_per_worker: float = 1.0):
    """A Ray Train ``TorchTrainer`` running :func:`train_loop_per_worker` on N workers.

    ``run_config`` defaults to storage under the run's directory and no retries
    (a dead worker fails the run; rerunning resumes from the sharded checkpoint).
    Tune trials pass ``RunConfig(callbacks=[TuneReportCallback()])``; inside a
    trial the workers' CPUs plus the trial's own must fit the cluster, so a
    fractional ``cpus_per_worker`` (e.g. 0.99) lets N workers fill N CPUs.
    """
    require("ray.train", "tune")
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = config_from_dict(spec["cfg"])
    dist = cfg.distributed
    spec = {**spec, "report": "ray"}
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if dist.use_gpu else {})}
    if run_config is None:
        out_dir = Path(spec["out_dir"])
        run_config = RunConfig(name=f"{out_dir.name}", storage_path=str(out_dir.parent / "ray"),
                               failure_config=FailureConfig(max_failures=0))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=dist.num_workers, use_gpu=dist.use_gpu,
                                     resources_per_worker=resources),
        # the process group DeepSpeed reuses: a dead peer fails a collective after timeout_s
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo", timeout_s=dist.timeout_s),
        run_config=run_config,
    )


def launch_ray(spec: dict[str, Any], address: str | None = None) -> dict[str, Any]:
    cfg = config_from_dict(spec["cfg"])
    joined = resolve_address(address)
    # the one Ray session helper: a caller's session is reused, a cluster joined (loopback heads
    # from cluster/start-local.sh included), else a private local Ray sized to this machine
    with ray_session(address=address, num_cpus=local_resources()["CPU"], num_gpus=local_resources()["GPU"],
                     log_to_driver=True) as ray:
        try:
            if joined:  # the cluster's totals: a request it can never satisfy would wait forever
                check_worker_resources(cfg, ray.cluster_resources(), where=f"the Ray cluster at {joined}")
            result = build_torch_trainer(spec).fit()
        except ConfigError:
            raise
        except Exception as exc:
            raise RuntimeError(_failure_message(spec, f"Ray Train: {type(exc).__name__}: {exc}")) from None
    if getattr(result, "error", None) is not None:
        raise RuntimeError(_failure_message(spec, f"Ray Train: {result.error}"))
    outcome = getattr(result, "return_value", None)
    return outcome if outcome is not None else json.loads((Path(spec["out_dir"]) / OUTCOME_FILE).read_text())


def run_deepspeed_trial(cfg: ExperimentConfig, *, kind: str = "pretrain", tags: Mapping[str, Any] | None = None,
                        cpus_per_worker: float = 1.0, name: str | None = None) -> dict[str, Any]:
    """Inside a Ray Tune function trainable: a sharded run whose per-epoch records
    reach Tune live (``TuneReportCallback``), so schedulers can stop it early.

    Wrap the trainable with ``tune.with_resources(fn, {"cpu": 0.01})`` (0 is refused);
    the trial's workers are scheduled on the same cluster. Returns rank 0's outcome.
    """
    require("ray.tune", "tune")
    from ray.train import FailureConfig, RunConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    validate_launch(cfg)
    spec = make_spec(cfg, kind=kind, tags=tags, quiet=True)
    out_dir = Path(spec["out_dir"])
    run_config = RunConfig(name=name or out_dir.name, storage_path=str(out_dir.parent / "ray"),
                           failure_config=FailureConfig(max_failures=0), callbacks=[TuneReportCallback()])
    result = build_torch_trainer(spec, run_config=run_config, cpus_per_worker=cpus_per_worker).fit()
    if getattr(result, "error", None) is not None:
        raise RuntimeError(_failure_message(spec, f"Ray Train: {result.error}"))
    return result.return_value or json.loads((out_dir / OUTCOME_FILE).read_text())


def _stderr_fd():
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stderr without a descriptor (some test runners)
        return None


def torchrun_command(nproc: int) -> list[str]:
    """``torchrun`` for ``nproc`` processes on this machine, without restarts; append the program.

    The rendezvous store binds port 0 itself (and the workers share it): a port picked beforehand
    and bound later by torchrun can be taken in between (a busy machine, Ray's sockets), which
    killed launches under load. Loopback only.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(int(nproc)),
            "--max_restarts", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
            "--rdzv-id", uuid.uuid4().hex, "--local-addr", "127.0.0.1"]


def launch_torchrun(spec: dict[str, Any]) -> dict[str, Any]:
    """N processes on this machine; a dead worker makes torchrun stop the rest and exit non-zero."""
    cfg = config_from_dict(spec["cfg"])
    out_dir = Path(spec["out_dir"])
    spec_path = out_dir / "launch" / "spec.json"
    atomic_write(spec_path, json.dumps(spec))
    (out_dir / OUTCOME_FILE).unlink(missing_ok=True)
    cmd = [*torchrun_command(cfg.distributed.num_workers), "-m", "sharp_unlearn.recipes.distributed", "worker",
           "--spec", str(spec_path)]
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker unless told otherwise
    # workers' stdout (DeepSpeed's chatter) goes to stderr: stdout stays the caller's (e.g. --json)
    proc = subprocess.run(cmd, env=env, stdout=_stderr_fd())
    if proc.returncode != 0:
        raise RuntimeError(_failure_message(spec, f"torchrun exited with code {proc.returncode} "
                                                  "(a worker died or raised; its error is printed above)"))
    return json.loads((out_dir / OUTCOME_FILE).read_text())


def _failure_message(spec: Mapping[str, Any], what: str) -> str:
    sharded = Path(spec["out_dir"]) / "deepspeed"
    progress = read_progress(sharded)
    where = (f"the last sharded checkpoint is {sharded / progress['tag']} (epoch {progress['epoch']}); "
             if progress else "no sharded checkpoint was committed yet; ")
    return f"sharded run failed: {what}; {where}rerun the same command to resume"


def _resolve_launch(cfg: ExperimentConfig, address: str | None,
                    launcher: str | None) -> tuple[ExperimentConfig, str | None]:
    """The launcher and Ray address a launch uses (arguments, then the config, then ``RAY_ADDRESS``
    for Ray), validated before any worker starts."""
    address = address or cfg.distributed.address or (
        os.environ.get("RAY_ADDRESS") if (launcher or cfg.distributed.launcher) == "ray" else None)
    if launcher is not None and launcher != cfg.distributed.launcher:
        cfg = config_from_dict({**cfg.to_dict(), "distributed": {**cfg.to_dict()["distributed"],
                                                                 "launcher": launcher}})
    validate_launch(cfg, address)
    return cfg, address


def launch_deepspeed(cfg: ExperimentConfig, *, train_indices=None, split_hash: str | None = None,
                     kind: str = "pretrain", tags: Mapping[str, Any] | None = None, quiet: bool = False,
                     resume: bool = True, use_cache: bool = True, address: str | None = None,
                     launcher: str | None = None, epoch_callback=None) -> TrainOutcome:
    """Validate, then train on ``distributed.num_workers`` workers; same outcome as single-device pretraining.

    ``epoch_callback(epoch, record)`` is called after the run for each epoch (the
    workers cannot reach the caller's process); live per-epoch reports to Ray Tune
    come from :func:`build_torch_trainer` with a ``TuneReportCallback``.
    """
    cfg, address = _resolve_launch(cfg, address, launcher)
    spec = make_spec(cfg, kind=kind, train_indices=train_indices, split_hash=split_hash, tags=tags,
                     quiet=quiet, resume=resume)
    ckpt_path = Path(spec["out_dir"]) / "checkpoint.pt"
    if use_cache and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if (state.get("completed") and state.get("config_hash") == distributed_config_hash(cfg)
                and state.get("split_hash") == (split_hash or "full") and "final_metrics" in state):
            return TrainOutcome(ckpt_path, dict(state["final_metrics"]), state.get("run_id"), cached=True,
                                wall_seconds=float(state.get("wall_seconds", 0.0)),
                                history=list(state.get("history", [])))
    if cfg.distributed.launcher == "ray":
        outcome = launch_ray(spec, address)
    else:
        outcome = launch_torchrun(spec)
    history = list(outcome.get("history", []))
    if epoch_callback is not None:
        for record in history:
            epoch_callback(int(record["epoch"]), record)
    return TrainOutcome(Path(outcome["checkpoint"]), dict(outcome["metrics"]), outcome.get("run_id"),
                        cached=False, wall_seconds=float(outcome["wall_seconds"]), history=history)


def make_unlearn_spec(cfg: ExperimentConfig, checkpoint: str | Path, split, out_dir: str | Path, *,
                      config_hash: str, quiet: bool = False, resume: bool = True,
                      reference_metrics: Mapping[str, float] | None = None,
                      reference_checkpoint: str | Path | None = None) -> dict[str, Any]:
    """A sharded unlearning stage's spec: the run config, the pretrained checkpoint and the split itself.

    With ``reference_metrics`` (the retrained reference's accuracies, which the driver
    holds) the workers evaluate every epoch as a single-process run does (``tow`` etc.);
    ``reference_checkpoint`` is recorded in the export for ``sharp-unlearn evaluate``.
    """
    cfg = _absolute(cfg)

    def ints(values):
        return [int(v) for v in np.asarray(values)]

    return {
        "cfg": cfg.to_dict(), "kind": "unlearn", "checkpoint": str(Path(checkpoint).resolve()),
        "split": {"forget_positions": ints(split.forget_positions), "retain_positions": ints(split.retain_positions),
                  "forget_indices": ints(split.forget_indices), "retain_indices": ints(split.retain_indices),
                  "split_hash": split.split_hash, "label": split.label,
                  "scores": None if split.scores is None else [float(v) for v in np.asarray(split.scores)]},
        "config_hash": config_hash, "quiet": quiet, "resume": resume,
        "reference_metrics": None if reference_metrics is None
        else {k: float(v) for k, v in reference_metrics.items()},
        "reference_checkpoint": None if reference_checkpoint is None else str(Path(reference_checkpoint).resolve()),
        "out_dir": str(Path(out_dir).resolve() / f"zero{cfg.distributed.zero_stage}x{cfg.distributed.num_workers}"),
    }


def launch_deepspeed_unlearn(cfg: ExperimentConfig, checkpoint: str | Path, split, out_dir: str | Path, *,
                             config_hash: str, quiet: bool = False, resume: bool = True,
                             address: str | None = None, launcher: str | None = None,
                             reference_metrics: Mapping[str, float] | None = None) -> TrainOutcome:
    """Run an unlearning method's phases ZeRO-sharded on ``distributed.num_workers`` workers.

    Returns the consolidated fp32 export (``checkpoint``, a project checkpoint whose
    ``model`` the driver loads), the wall time and the per-epoch history (with
    ``reference_metrics``, each evaluated epoch's accuracies and ``tow``, measured sharded);
    ``metrics`` is empty: the driver measures the final model on its own copy.
    """
    cfg, address = _resolve_launch(cfg, address, launcher)
    spec = make_unlearn_spec(cfg, checkpoint, split, out_dir, config_hash=config_hash, quiet=quiet, resume=resume,
                             reference_metrics=reference_metrics)
    outcome = launch_ray(spec, address) if cfg.distributed.launcher == "ray" else launch_torchrun(spec)
    return TrainOutcome(Path(outcome["checkpoint"]), {}, None, cached=False,
                        wall_seconds=float(outcome["wall_seconds"]), history=list(outcome.get("history", [])))


# ---------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``validate`` / ``launch`` (driver) and ``worker`` (one rank under torchrun or deepspeed)."""
    parser = argparse.ArgumentParser(prog="python -m sharp_unlearn.recipes.distributed",
                                     description=__doc__.splitlines()[0])
    # the deepspeed launcher puts --local_rank=N right after the module name, before the action
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="action", required=True)
    for name, text in (("validate", "check the config, DeepSpeed JSON and resources; start nothing"),
                       ("launch", "validate, then run on N workers (Ray Train or torchrun)"),
                       ("worker", "one rank (run under torchrun/deepspeed; reads RANK, WORLD_SIZE)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", "-c", action="append", default=[], metavar="FILE")
        p.add_argument("overrides", nargs="*", metavar="key=value")
        if name == "launch":
            p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
            p.add_argument("--launcher", choices=("ray", "torchrun"), default=None)
            p.add_argument("--no-resume", action="store_true")
        if name == "worker":
            p.add_argument("--spec", default=None, help="spec JSON written by the launcher")
            p.add_argument("--local_rank", "--local-rank", dest="local_rank_", type=int, default=None,
                           help="passed by the deepspeed launcher; LOCAL_RANK is read from the environment")
    args = parser.parse_args(argv)
    try:
        if args.action == "worker":
            if args.spec:
                spec = json.loads(Path(args.spec).read_text())
            else:
                cfg = load_config(args.config, args.overrides)
                validate_distributed(cfg, available={"CPU": 10**9, "GPU": 10**9})  # the launcher placed us
                spec = make_spec(cfg)
            run_worker(spec)
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.action == "validate":
            ds = validate_launch(cfg)
            print(json.dumps(ds, indent=1))
            return 0
        outcome = launch_deepspeed(cfg, address=args.address, launcher=args.launcher,
                                   resume=not args.no_resume, use_cache=False)
        print(json.dumps({"checkpoint": str(outcome.checkpoint), "run_id": outcome.run_id, **outcome.metrics},
                         indent=1, default=float))
        return 0
    except ConfigError as exc:
        print(f"{parser.prog} {args.action}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
