"""The held-out memorization estimator: K trainings on random subsets, as Ray tasks.

Model ``k`` of a run trains on a subset fixed by ``(seed, k, p)`` alone, with a
seed derived from ``(seed, k)``, using the project's own loop
(:func:`sharp_unlearn.engine.runner.run_stage`, same objective and optimizer as
pretraining, so SAM-trained models can be scored too). Its outcome (subset
mask, correctness on every training and test example) is one small ``.npz``
file under ``<run dir>/models/``, written atomically by the driver as each
task finishes. Rerunning the same command therefore trains only the models
whose files are missing, after a crash, a Ctrl-C, or when K grows (K=100
after K=50 trains 50 more).

Each model trains without checkpoints: a model is minutes at most, and K
checkpoints of a ResNet would be tens of GB; the unit of resumption is the
model. Tracking is off inside tasks; the driver logs one MLflow run.

Ray: without ``address`` (and no ``RAY_ADDRESS``) a local Ray is started for
the run (``address="local"``, never attaching to someone else's instance),
sized to ``workers * cpus_per_model`` or to the machine, and shut down in a
``finally``. With an address the tasks go to that cluster; every node needs
the package installed and the data under the same ``data.root``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from sharp_unlearn.config import ExperimentConfig, config_from_dict, stable_hash
from sharp_unlearn.data import build_dataset
from sharp_unlearn.engine.loop import predict
from sharp_unlearn.engine.objective import Objective, Phase
from sharp_unlearn.engine.runner import resolve_device, run_stage
from sharp_unlearn.errors import ConfigError, require
from sharp_unlearn.files import atomic_path
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.models import build_model
from sharp_unlearn.optim.factory import sam_spec
from sharp_unlearn.progress import progress_bar
from sharp_unlearn.ray_cluster import ray_session

EXECUTORS = ("ray", "serial")
#: bump when the per-model file layout or the subset rule changes (old files are then retrained)
FORMAT_VERSION = 1


@dataclass
class HeldoutSettings:
    """How the K trainings are run (validated on construction, like config sections)."""

    num_models: int = 100
    #: share of the training set each model sees (Feldman & Zhang: 0.7)
    subset_fraction: float = 0.7
    #: trainings running at once (None: as many as the Ray cluster's CPUs / GPUs allow)
    workers: int | None = None
    cpus_per_model: float = 1.0
    gpus_per_model: float = 0.0
    #: Ray cluster address (None: $RAY_ADDRESS, else a local Ray started for the run)
    address: str | None = None
    #: "ray" (tasks) or "serial" (in this process; debugging, tiny runs)
    executor: str = "ray"
    #: also estimate the influence of each training example on each test example
    influence: bool = False
    influence_top_k: int = 10
    #: reuse model files already on disk (False: retrain and overwrite them)
    resume: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.num_models, bool) or int(self.num_models) != self.num_models or self.num_models < 2:
            raise ConfigError(f"memorization models={self.num_models!r} is not valid; expected an integer >= 2 "
                              "(the estimator compares models that saw an example with models that did not)")
        if not 0.0 < self.subset_fraction < 1.0:
            raise ConfigError(f"memorization subset_fraction={self.subset_fraction!r} is out of range; "
                              "expected a value in (0, 1)")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"memorization workers={self.workers!r} is not valid; expected an integer >= 1")
        if self.cpus_per_model <= 0:
            raise ConfigError(f"memorization cpus_per_model={self.cpus_per_model!r} is out of range; expected > 0")
        if self.gpus_per_model < 0:
            raise ConfigError(f"memorization gpus_per_model={self.gpus_per_model!r} is out of range; expected >= 0")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"memorization executor={self.executor!r} is not valid; "
                              f"expected one of: {', '.join(EXECUTORS)}")
        if self.influence_top_k < 1:
            raise ConfigError(f"memorization influence_top_k={self.influence_top_k!r} is out of range; "
                              "expected an integer >= 1")
        self.num_models = int(self.num_models)

    def params(self) -> dict[str, Any]:
        """MLflow params, next to the flattened experiment config."""
        return {f"memorization.{k}": v for k, v in dataclasses.asdict(self).items()}


@dataclass
class ModelOutcome:
    """What one subset model contributes to the estimate (arrays by training position)."""

    model_id: int
    mask: np.ndarray            # bool [n_train]: in this model's subset
    train_correct: np.ndarray   # bool [n_train]
    test_correct: np.ndarray    # bool [n_test]
    wall_seconds: float
    fingerprint: str


@dataclass
class HeldoutRun:
    """The K outcomes stacked, plus what this invocation did."""

    run_dir: Path
    masks: np.ndarray           # [K, n_train]
    train_correct: np.ndarray   # [K, n_train]
    test_correct: np.ndarray    # [K, n_test]
    trained: list[int] = field(default_factory=list)   # model ids trained by this call
    reused: list[int] = field(default_factory=list)    # model ids loaded from disk
    model_seconds: list[float] = field(default_factory=list)  # per-model training time (all K)
    wall_seconds: float = 0.0


# ---------------------------------------------------------------- the rules
def model_seed(seed: int, model_id: int) -> int:
    """Training seed of model ``model_id`` (initialisation, data order)."""
    return int((seed * 1_000_003 + 7_919 * (model_id + 1)) % (2**31 - 1))


def subset_mask(num_examples: int, fraction: float, seed: int, model_id: int) -> np.ndarray:
    """Model ``model_id``'s subset: exactly ``round(fraction * n)`` examples, fixed by
    (seed, model id, fraction) alone, so it does not depend on K or on the order models run."""
    size = int(round(fraction * num_examples))
    size = min(max(size, 1), num_examples - 1)
    rng = np.random.default_rng([int(seed), int(model_id), 0x6D656D])
    mask = np.zeros(num_examples, dtype=bool)
    mask[rng.choice(num_examples, size=size, replace=False)] = True
    return mask


def run_fingerprint(cfg: ExperimentConfig, fraction: float, n_train: int, n_test: int) -> str:
    """What a model file must match to be reused: the training recipe, p, and the data sizes."""
    return stable_hash({"training": cfg.training_hash(), "fraction": float(fraction), "n_train": n_train,
                        "n_test": n_test, "format": FORMAT_VERSION})


def default_run_dir(cfg: ExperimentConfig, fraction: float) -> Path:
    """``<output_dir>/memorization/<data>-<model>-<optimizer>-s<seed>-<training hash>-p<p>``; K is
    not part of it, so a larger K reuses the models of a smaller one."""
    name = (f"{cfg.data.name}-{cfg.model.name}-{cfg.optimizer.tag}-s{cfg.seed}-{cfg.training_hash()}"
            f"-p{fraction:g}")
    return Path(cfg.output_dir) / "memorization" / name


def model_path(run_dir: Path, model_id: int) -> Path:
    return Path(run_dir) / "models" / f"model-{model_id:05d}.npz"


# ---------------------------------------------------------------- model files
def save_outcome(path: Path, outcome: ModelOutcome) -> Path:
    """Atomic (a kill leaves the old file or none, never half of one)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, model_id=np.int64(outcome.model_id), mask=np.packbits(outcome.mask),
                 train_correct=np.packbits(outcome.train_correct),
                 test_correct=np.packbits(outcome.test_correct),
                 n_train=np.int64(len(outcome.mask)), n_test=np.int64(len(outcome.test_correct)),
                 wall_seconds=np.float64(outcome.wall_seconds), fingerprint=np.str_(outcome.fingerprint))
    return path


def load_outcome(path: Path, fingerprint: str) -> ModelOutcome | None:
    """A stored outcome, or None when missing, unreadable or from another recipe."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) != fingerprint:
                return None
            n_train, n_test = int(data["n_train"]), int(data["n_test"])
            return ModelOutcome(
                model_id=int(data["model_id"]),
                mask=np.unpackbits(data["mask"], count=n_train).astype(bool),
                train_correct=np.unpackbits(data["train_correct"], count=n_train).astype(bool),
                test_correct=np.unpackbits(data["test_correct"], count=n_test).astype(bool),
                wall_seconds=float(data["wall_seconds"]), fingerprint=fingerprint)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # truncated or foreign: retrain it
        return None


# ---------------------------------------------------------------- one training
_BUNDLES: dict[str, Any] = {}


def _cached_bundle(cfg: ExperimentConfig):
    """Build the data set once per worker process (Ray reuses workers across tasks)."""
    key = stable_hash({"data": dataclasses.asdict(cfg.data), "seed": cfg.seed})
    if key not in _BUNDLES:
        _BUNDLES.clear()  # one data set per worker at a time
        _BUNDLES[key] = build_dataset(cfg.data, cfg.seed)
    return _BUNDLES[key]


def correct_by_position(model, dataset, batch_size: int, device) -> np.ndarray:
    """Correctness of every example, in dataset position order."""
    out = predict(model, dataset, batch_size, device)
    return (out["logits"].argmax(1) == out["labels"]).numpy().astype(bool)


def train_subset_model(cfg: ExperimentConfig, model_id: int, fraction: float, bundle=None,
                       threads: int | None = None) -> ModelOutcome:
    """Train model ``model_id`` on its subset and measure it on every train and test example.

    The same objective and optimizer as pretraining (SAM when configured); no
    checkpoints, no tracking, no progress bar.
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        bundle = bundle if bundle is not None else _cached_bundle(cfg)
        from torch import _dynamo  # noqa: F401  (a process's first optimizer imports it: seconds, not model cost)

        start = time.perf_counter()  # the model's cost: training + measuring, not loading data
        n_train, n_test = len(bundle.train_eval), len(bundle.test)
        mask = subset_mask(n_train, fraction, cfg.seed, model_id)
        # the data set (and its label flips) keep the run's seed; the model gets its own
        model_cfg = dataclasses.replace(cfg, seed=model_seed(cfg.seed, model_id),
                                        tracking=dataclasses.replace(cfg.tracking, enabled=False))
        device = resolve_device(cfg.device)
        torch.manual_seed(model_cfg.seed)
        model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
        phase = Phase("memorization-model", [Objective("ce", "train", cross_entropy,
                                                       sam=sam_spec(cfg.optimizer))])
        subset = Subset(bundle.train, np.flatnonzero(mask).tolist())
        run_stage(model, lambda epoch: [phase], {"train": subset}, cfg=model_cfg, optimizer_cfg=cfg.optimizer,
                  train_cfg=cfg.train, epochs=cfg.train.epochs, device=device, checkpoint_path=None,
                  quiet=True, description=f"memorization model {model_id}", resume=False)
        eval_bs = cfg.data.eval_batch_size
        return ModelOutcome(model_id=model_id, mask=mask,
                            train_correct=correct_by_position(model, bundle.train_eval, eval_bs, device),
                            test_correct=correct_by_position(model, bundle.test, eval_bs, device),
                            wall_seconds=time.perf_counter() - start,
                            fingerprint=run_fingerprint(cfg, fraction, n_train, n_test))
    finally:
        if threads:
            torch.set_num_threads(previous_threads)


def _train_task(cfg_dict: dict, model_id: int, fraction: float, threads: int) -> ModelOutcome:
    """Ray task body: rebuild the config (plain dicts travel safely) and train one model."""
    return train_subset_model(config_from_dict(cfg_dict), model_id, fraction, threads=threads)


# ---------------------------------------------------------------- executors
def _threads(settings: HeldoutSettings) -> int:
    return max(1, int(settings.cpus_per_model))


def _run_serial(cfg: ExperimentConfig, ids: list[int], settings: HeldoutSettings,
                bundle) -> Iterator[ModelOutcome]:
    for model_id in ids:
        yield train_subset_model(cfg, model_id, settings.subset_fraction, bundle=bundle,
                                 threads=_threads(settings))


def heldout_ray_session(settings: HeldoutSettings):
    """The run's Ray session (see :func:`sharp_unlearn.ray_cluster.ray_session`): a caller's, the
    cluster at ``settings.address`` / $RAY_ADDRESS, or a local Ray sized to the run."""
    cpus = math.ceil(settings.workers * settings.cpus_per_model) if settings.workers else (os.cpu_count() or 1)
    return ray_session(address=settings.address, num_cpus=max(cpus, math.ceil(settings.cpus_per_model)),
                       log_to_driver=False, logging_level="WARNING", object_store_memory=256 * 2**20)


def concurrency(settings: HeldoutSettings, resources: dict[str, float]) -> int:
    """How many trainings to keep in flight: ``workers``, else what the cluster fits."""
    if settings.workers:
        return settings.workers
    by_cpu = int(resources.get("CPU", 1) // settings.cpus_per_model)
    if settings.gpus_per_model > 0:
        by_gpu = int(resources.get("GPU", 0) // settings.gpus_per_model)
        if by_gpu < 1:
            raise ConfigError(f"memorization gpus_per_model={settings.gpus_per_model} but the Ray cluster has "
                              f"{resources.get('GPU', 0)} GPUs; use gpus_per_model=0 or a cluster with GPUs")
        return max(1, min(by_cpu, by_gpu))
    return max(1, by_cpu)


#: how long an interrupted run waits for its cancelled trainings to end before shutting Ray down
_CANCEL_SETTLE_S = 30.0


def _run_ray(ray, cfg: ExperimentConfig, ids: list[int], settings: HeldoutSettings, *,
             cancel_on_exit: bool = True) -> Iterator[ModelOutcome]:
    """Submit trainings as Ray tasks, at most ``concurrency`` in flight, yielding each as it
    finishes (in completion order). Bounded submission keeps an interrupt cheap: at most
    the in-flight models are lost.

    ``cancel_on_exit``: cancel the trainings still in flight when the run ends early. Only
    for a session the caller keeps using; a session about to be shut down ends them itself,
    without ``ray.cancel``, whose race with a task that is just finishing crashes the
    driver's core worker in this Ray ("Tried to complete task that was not pending", exit 1
    instead of 130; fixed upstream in ray-project/ray#54798)."""
    task = ray.remote(num_cpus=settings.cpus_per_model, num_gpus=settings.gpus_per_model,
                      max_retries=1)(_train_task)
    cfg_dict = cfg.to_dict()
    in_flight = concurrency(settings, ray.cluster_resources())
    queue = list(ids)
    pending: dict[Any, int] = {}
    try:
        while queue or pending:
            while queue and len(pending) < in_flight:
                model_id = queue.pop(0)
                pending[task.remote(cfg_dict, model_id, settings.subset_fraction, _threads(settings))] = model_id
            # a timeout returns to Python now and then, so a signal (Ctrl-C, SIGTERM) is handled promptly
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                pending.pop(ref)
                yield ray.get(ref)
    finally:
        if pending and cancel_on_exit:  # an interrupted run does not leave trainings running
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)  # not force: a KeyboardInterrupt in the task, the gentler path
            # let every cancelled task settle before the caller goes on. Bounded; a second
            # signal ends the wait.
            with contextlib.suppress(BaseException):
                ray.wait(list(pending), num_returns=len(pending), timeout=_CANCEL_SETTLE_S)


# ---------------------------------------------------------------- the driver
def run_heldout(cfg: ExperimentConfig, settings: HeldoutSettings, *, bundle=None, run_dir: Path | None = None,
                quiet: bool = False, on_model_done: Callable[[ModelOutcome], None] | None = None) -> HeldoutRun:
    """Train the missing subset models of a run and stack all K outcomes.

    ``on_model_done`` is called after each new model's file is written (a
    progress hook; an exception it raises interrupts the run like Ctrl-C).
    """
    started = time.perf_counter()
    bundle = bundle if bundle is not None else build_dataset(cfg.data, cfg.seed)
    n_train, n_test = len(bundle.train_eval), len(bundle.test)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, settings.subset_fraction)
    fingerprint = run_fingerprint(cfg, settings.subset_fraction, n_train, n_test)
    outcomes: dict[int, ModelOutcome] = {}
    if settings.resume:
        for model_id in range(settings.num_models):
            found = load_outcome(model_path(run_dir, model_id), fingerprint)
            if found is not None:
                outcomes[model_id] = found
    reused = sorted(outcomes)
    missing = [k for k in range(settings.num_models) if k not in outcomes]
    trained: list[int] = []
    if missing:
        # bad model options fail here, as a ConfigError, not K times inside Ray workers
        build_model(cfg.model, bundle.num_classes, bundle.input_shape)
        (run_dir / "models").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        with contextlib.ExitStack() as stack:
            if settings.executor == "ray":
                callers_session = require("ray", "tune").is_initialized()
                ray = stack.enter_context(heldout_ray_session(settings))
                results = _run_ray(ray, cfg, missing, settings, cancel_on_exit=callers_session)
            else:
                results = _run_serial(cfg, missing, settings, bundle)
            advance = stack.enter_context(progress_bar(
                f"memorization models ({len(reused)} on disk)", len(missing), quiet))
            try:
                for outcome in results:
                    if outcome.fingerprint != fingerprint:  # a worker with another package version
                        raise RuntimeError(f"model {outcome.model_id} came back with fingerprint "
                                           f"{outcome.fingerprint}, expected {fingerprint}; are all Ray nodes "
                                           "running the same sharp-unlearn version and data?")
                    save_outcome(model_path(run_dir, outcome.model_id), outcome)
                    outcomes[outcome.model_id] = outcome
                    trained.append(outcome.model_id)
                    advance(status=f"model {outcome.model_id}: {outcome.wall_seconds:.1f}s")
                    if on_model_done is not None:
                        on_model_done(outcome)
            finally:
                if hasattr(results, "close"):
                    results.close()  # settle in-flight Ray tasks before the session closes
    ordered = [outcomes[k] for k in range(settings.num_models)]
    return HeldoutRun(
        run_dir=run_dir,
        masks=np.stack([o.mask for o in ordered]),
        train_correct=np.stack([o.train_correct for o in ordered]),
        test_correct=np.stack([o.test_correct for o in ordered]),
        trained=trained, reused=reused,
        model_seconds=[o.wall_seconds for o in ordered],
        wall_seconds=time.perf_counter() - started,
    )
