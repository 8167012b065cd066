"""The MLflow run tree of a sweep: a parent run (``kind=sweep``) and one child run per trial.

Child runs are written by the *driver*, from the results Ray Tune hands it
(a Tune ``Callback``): trials need no route to the tracking store (a SQLite
file on the head node works for a whole cluster) and there is one writer.
Each child carries ``kind=trial``, ``mlflow.parentRunId``, ``trial_id``,
the contract tags, the trial's resolved config as params, and its metrics
per epoch (``step`` = epoch; the last report is the final value).

The trial -> run id map is kept in a JSON file next to the sweep, so a
retried or resumed trial continues its own run instead of opening a second
one. The callback is pickled with the Tuner (``Tuner.restore``), so it holds
no client, only what is needed to make one.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sharp_unlearn.errors import termination_requested
from sharp_unlearn.files import atomic_write
from sharp_unlearn.methods import METHODS
from sharp_unlearn.optim.factory import sam_spec
from sharp_unlearn.tracking import MlflowTracker, client_for, standard_tags
from sharp_unlearn.tuning.spec import resolve_trial_trees
from sharp_unlearn.validation import config_from_dict

#: result keys Ray adds itself, or that are bookkeeping rather than metrics
_NOT_METRICS = {"epoch", "epochs_planned", "done", "trial_id", "experiment_id", "date", "hostname", "node_ip",
                "pid", "timestamp", "time_this_iter_s", "time_total_s", "training_iteration",
                "time_since_restore", "iterations_since_restore", "timesteps_since_restore", "timesteps_total",
                "episodes_total", "checkpoint_dir_name", "should_checkpoint", "experiment_tag"}


def mlflow_client(uri: str):
    return client_for(uri)  # creates a fresh SQLite store once, under its lock


def trial_tags(stage: str, pre_cfg, un_cfg) -> dict[str, Any]:
    """Contract tags of one trial from its resolved configs (the README's "Names users query")."""
    cfg = un_cfg if un_cfg is not None else pre_cfg
    tags: dict[str, Any] = {"dataset": cfg.data.name, "model": cfg.model.name, "seed": cfg.seed,
                            "optimizer": cfg.optimizer.tag}
    if un_cfg is not None:
        method = METHODS.get(un_cfg.method.name)(un_cfg.method, un_cfg.optimizer, sam_spec(un_cfg.optimizer))
        tags.update(method=un_cfg.method.name, optimizer=method.optimizer_tag, forget_set=un_cfg.forget.label)
        if pre_cfg is not None:
            tags["pretrain_optimizer"] = pre_cfg.optimizer.tag
    return tags


def trial_params(stage: str, pre_cfg, un_cfg) -> dict[str, Any]:
    """The resolved config as dotted params; stage ``both`` adds the pretraining side as ``pretrain.*``."""
    if stage == "pretrain":
        return pre_cfg.flat()
    params = dict(un_cfg.flat())
    if stage == "both":
        params.update({f"pretrain.{k}": v for k, v in pre_cfg.flat().items()})
    return params


def read_json(path: str | Path | None) -> dict[str, Any]:
    """A bookkeeping file of the sweep (run ids, trial status); empty when it is not there yet."""
    if path and Path(path).is_file():
        return json.loads(Path(path).read_text())
    return {}


def _write_json(path: str, data: dict[str, Any]) -> None:
    # a resumed sweep trusts these files: a crash mid-write must leave the previous version
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True))


class TrialRunsMixin:
    """Tune callback hooks: which trials truly finished, and (with a tracking URI) their MLflow runs.

    Finished means Tune ended the trial itself (it ran out of epochs, or the
    scheduler stopped it): ``on_trial_complete``. An interrupted sweep also
    ends its running trials, but without that hook; those resume on
    ``--resume``. The status file is what the driver trusts for that.
    Mixed into a ``ray.tune.Callback`` in ``tuning/callback.py`` (the only
    module here importing Ray at the top).
    """

    def __init__(self, *, status_file: str, sweep: str, stage: str, dims, pretrain_tree, unlearn_tree,
                 unlearn_overrides, uri: str | None = None, experiment_id: str | None = None,
                 parent_run_id: str | None = None, map_file: str | None = None,
                 common_tags: Mapping[str, Any] | None = None):
        self.status_file = status_file
        self.uri = uri if parent_run_id else None
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.map_file = map_file
        self.sweep = sweep
        self.stage = stage
        self.dims = dims
        self.pretrain_tree = pretrain_tree
        self.unlearn_tree = unlearn_tree
        self.unlearn_overrides = unlearn_overrides
        self.common_tags = dict(common_tags or {})
        self._client = None
        self._runs: dict[str, str] | None = None
        self._status: dict[str, str] | None = None

    # a pickled Tuner (for --resume) must carry no live client; the files hold the state
    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_client=None, _runs=None, _status=None)
        return state

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_client(self.uri)
        return self._client

    @property
    def runs(self) -> dict[str, str]:
        if self._runs is None:
            self._runs = read_json(self.map_file)
        return self._runs

    @property
    def status(self) -> dict[str, str]:
        if self._status is None:
            self._status = read_json(self.status_file)
        return self._status

    def _set_status(self, trial_id: str, value: str | None) -> None:
        if value is None:
            self.status.pop(trial_id, None)
        else:
            self.status[trial_id] = value
        _write_json(self.status_file, self.status)

    # -- hooks -----------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.status:  # an errored trial restarted by --resume
            self._set_status(trial.trial_id, None)
        if self.uri is None:
            return

        existing = self.runs.get(trial.trial_id)
        if existing:  # a retried or resumed trial continues its own run
            with contextlib.suppress(Exception):
                self.client.update_run(existing, status="RUNNING")
            return
        params = {d.key: trial.config[d.key] for d in self.dims if d.key in trial.config}
        pre, un = resolve_trial_trees(self.stage, self.dims, params, self.pretrain_tree, self.unlearn_tree,
                                      self.unlearn_overrides)
        pre_cfg = config_from_dict(pre) if pre is not None else None
        un_cfg = config_from_dict(un) if un is not None else None
        tags = {**standard_tags("trial"), **self.common_tags, **trial_tags(self.stage, pre_cfg, un_cfg),
                "mlflow.parentRunId": self.parent_run_id, "trial_id": trial.trial_id, "sweep": self.sweep,
                "searched": ", ".join(f"{k}={_short(v)}" for k, v in params.items())}
        run = self.client.create_run(self.experiment_id, run_name=f"{self.sweep}-{trial.trial_id}",
                                     tags={k: str(v)[:5000] for k, v in tags.items() if v is not None})
        self.runs[trial.trial_id] = run.info.run_id
        _write_json(self.map_file, self.runs)
        MlflowTracker(self.client, run.info.run_id, uri=self.uri).log_params(trial_params(self.stage, pre_cfg,
                                                                                          un_cfg))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.runs.get(trial.trial_id) if self.uri else None
        if run_id is None:
            return

        metrics = {k: v for k, v in result.items()
                   if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        MlflowTracker(self.client, run_id, uri=self.uri).log_metrics(metrics, step=epoch)

    def _finish(self, trial, status: str, tags: Mapping[str, Any]) -> None:
        run_id = self.runs.get(trial.trial_id) if self.uri else None
        if run_id is None:
            return

        with contextlib.suppress(Exception):
            MlflowTracker(self.client, run_id, uri=self.uri).set_tags(tags)
        with contextlib.suppress(Exception):
            self.client.set_terminated(run_id, status=status)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._set_status(trial.trial_id, "TERMINATED")
        last = trial.last_result or {}
        epoch = int(last.get("epoch", 0))
        planned = int(last.get("epochs_planned", epoch))
        self._finish(trial, "FINISHED", {"epochs_run": epoch, "stopped_early": str(epoch < planned).lower(),
                                         "diverged": "true" if last.get("diverged") else None})

    def on_trial_recover(self, iteration, trials, trial, **info):
        run_id = self.runs.get(trial.trial_id) if self.uri else None
        if run_id is not None:
            with contextlib.suppress(Exception):
                self.client.set_tag(run_id, "retries", str(trial.run_metadata.num_failures))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._set_status(trial.trial_id, "ERROR")
        error = getattr(trial, "error_file", None) or ""
        self._finish(trial, "FAILED", {"error": f"trial failed after {trial.run_metadata.num_failures} "
                                                f"attempt(s); see {error}" if error else "trial failed"})

    def on_experiment_end(self, trials, **info):
        # an interrupted sweep ends its running trials without on_trial_complete; --resume reopens their runs
        for trial in trials:
            if trial.trial_id not in self.status:
                self._finish(trial, "KILLED", {"interrupted": "true"})


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@contextlib.contextmanager
def reopened_run(uri: str, run_id: str) -> Iterator[Any]:
    """Continue an existing run (a resumed sweep's parent): RUNNING again, ended like ``tracked_run``."""
    client = mlflow_client(uri)
    client.update_run(run_id, status="RUNNING")
    tracker = MlflowTracker(client, run_id, uri=uri, experiment_id=client.get_run(run_id).info.experiment_id)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) or termination_requested():  # Ray's SIGTERM handler: SystemExit
            status = "KILLED"
        raise
    finally:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status=status)
