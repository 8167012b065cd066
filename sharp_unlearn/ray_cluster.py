"""One way to open a Ray session for a command: join a cluster or start a private local one.

Every Ray-backed command (``sweep``, ``memorization``, sharded ``pretrain``/``unlearn``) goes
through :func:`ray_session`, so ``--address HOST:PORT`` and ``$RAY_ADDRESS`` behave the same in
all of them, including against a head started on this machine's loopback address by
``cluster/start-local.sh``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sharp_unlearn.errors import handle_sigterm, init_ray, require

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def resolve_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``$RAY_ADDRESS``, else None (start a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host in LOOPBACK_HOSTS


def _token_on_disk() -> bool:
    """``ray start`` keeps the cluster's auth token here (or where $RAY_AUTH_TOKEN_PATH says)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).is_file()


def _loopback_connect_settings(ray, address: str) -> Callable[[], None]:
    """Let this driver join a Ray head listening only on loopback; returns the undo.

    Ray (2.60) rewrites a 127.0.0.1 bootstrap address to the node's outward IP, where a
    loopback-only head does not listen ("Failed to connect to Ray cluster at <node IP>:PORT"),
    unless clusters are marked unsupported for this platform (it then keeps the loopback IP).
    Ray reads that switch into a module constant when it is imported, so the constant itself is
    set for the session (the environment variable too, for a Ray imported later in this process).
    And a driver given an explicit address sends the token ``ray start`` wrote only when token
    auth is switched on explicitly; a token on disk next to a loopback head is that head's.
    """
    if not is_loopback(address):
        return lambda: None
    saved_env = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")}
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        from ray._private import ray_constants
    except ImportError:  # another Ray layout: the environment variable is all there is
        ray_constants = None
    saved_constant = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if ray_constants is not None and saved_constant is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    token_switched_on = saved_env["RAY_AUTH_MODE"] is None and _token_on_disk()
    if token_switched_on:
        os.environ["RAY_AUTH_MODE"] = "token"
        _refresh_ray_config()

    def undo() -> None:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if ray_constants is not None and saved_constant is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if token_switched_on:
            _refresh_ray_config()

    return undo


#: Ray reads how much to lower the priority of the workers a new instance starts from this variable
WORKER_NICENESS_ENV = "RAY_worker_niceness"


@contextlib.contextmanager
def _workers_at_the_commands_priority() -> Iterator[None]:
    """Start a local Ray whose workers run at this command's niceness, not Ray's default of 15.

    Ray lowers its worker processes (trials, Train workers, memorization models) to nice 15 so a
    cluster node's raylet stays responsive. On a machine shared with other work that starves the
    command's own training: beside two nice-0 busy processes on 2 cores a nice-15 worker gets ~3 %
    of a core (weights 36 vs 1024), and a Ray-backed command ran 12-19x slower than on a quiet
    machine, where in-process training slows ~2x. The value is an increment a worker adds to the
    niceness it inherits, so 0 keeps the command's own (``nice -n 5 sharp-unlearn sweep ...`` runs
    its trials at 5). Workers inherit the variable from the raylet that ``ray.init`` starts, so it
    only needs to be set while Ray starts; a value the user set (e.g. 15, Ray's own) is kept.
    """
    if os.environ.get(WORKER_NICENESS_ENV) is not None:
        yield
        return
    os.environ[WORKER_NICENESS_ENV] = "0"
    try:
        yield
    finally:
        os.environ.pop(WORKER_NICENESS_ENV, None)


def _refresh_ray_config() -> None:
    # Ray caches its configuration (auth mode included) in C++; re-reading it is how Ray itself
    # switches token auth on for a process
    with contextlib.suppress(ImportError, AttributeError):
        from ray._raylet import Config

        Config.initialize("")


@contextlib.contextmanager
def ray_session(*, address: str | None = None, num_cpus: float | None = None, state_api: bool = False,
                **init_kwargs: Any) -> Iterator[Any]:
    """Yield the ``ray`` module with a session open for the block.

    - Ray already initialized (a notebook, a Ray Tune trial, a caller's session): reuse it and
      never shut it down.
    - Else join ``address``, else ``$RAY_ADDRESS``; a loopback address works against a head started
      by ``cluster/start-local.sh`` (see :func:`_loopback_connect_settings`).
    - Else start a private local Ray with ``num_cpus`` (default: this machine's CPUs); never an
      instance someone else started on this machine. Its dashboard (on 127.0.0.1 only) runs when
      ``state_api`` is set: Ray Train's placement-group cleaner asks the state API, served by the
      dashboard, whether a run's controller is still alive; without it the workers' placement group
      of a Train run whose trial was stopped (ASHA) is never released, and the next sharded trial
      waits for its CPUs forever. Commands that run no Ray Train job leave it off (start-up time).
      Its workers run at this command's niceness (see :func:`_workers_at_the_commands_priority`).

    ``init_kwargs`` go to ``ray.init`` (those only meaningful for a new instance, like
    ``object_store_memory``, are dropped when joining). Inside the block SIGTERM unwinds like
    Ctrl-C (``ray.init`` installs a handler that exits the driver abruptly). A session this call
    opened is shut down in a ``finally``, whatever happens.
    """
    ray = require("ray", "tune")
    if ray.is_initialized():
        yield ray
        return
    address = resolve_address(address)
    undo = _loopback_connect_settings(ray, address) if address else (lambda: None)
    try:
        if address:
            joining = {k: v for k, v in init_kwargs.items() if k not in _NEW_INSTANCE_ONLY}
            init_ray(ray, address=address, **joining)
        else:
            dashboard = {"include_dashboard": True, "dashboard_host": "127.0.0.1"} if state_api \
                else {"include_dashboard": False}
            with _workers_at_the_commands_priority():
                init_ray(ray, address="local", num_cpus=num_cpus or os.cpu_count() or 1,
                         **{**dashboard, **init_kwargs})
        with handle_sigterm():
            yield ray
    finally:
        try:
            ray.shutdown()
        finally:
            undo()


#: ``ray.init`` arguments that size or configure a new instance; Ray refuses them when joining one
_NEW_INSTANCE_ONLY = frozenset({"num_cpus", "num_gpus", "resources", "object_store_memory",
                                "include_dashboard", "dashboard_host", "dashboard_port", "_system_config",
                                "_temp_dir", "labels"})
