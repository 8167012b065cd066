"""ray_cluster.ray_session against a stand-in ``ray`` module: which session it opens, what it shuts
down, the loopback/token settings it applies for the session only, SIGTERM as an interrupt.
(The real thing, a head started by cluster/start-local.sh: tests/integration/test_ray_address.py.)"""

import os
import signal

import pytest

from sharp_unlearn import ray_cluster
from sharp_unlearn.errors import Terminated
from sharp_unlearn.ray_cluster import ray_session


@pytest.fixture(autouse=True)
def _forget_termination(monkeypatch):
    """A SIGTERM noted here must not read as an interruption in later tests (init_ray checks it)."""
    from sharp_unlearn import errors

    monkeypatch.setitem(errors._termination, "requested", False)


class FakeRay:
    def __init__(self, initialized=False):
        self.initialized = initialized
        self.calls = []
        self.seen_env = None
        self.seen_niceness = "never initialized"

    def is_initialized(self):
        return self.initialized

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        self.seen_env = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        self.seen_niceness = os.environ.get("RAY_worker_niceness")
        self.initialized = True

    def shutdown(self):
        self.calls.append(("shutdown", {}))
        self.initialized = False


@pytest.fixture
def fake_ray(monkeypatch, tmp_path):
    fake = FakeRay()
    monkeypatch.setattr(ray_cluster, "require", lambda module, extra: fake)
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_worker_niceness"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no auth token unless a test writes one
    return fake


def test_reuses_a_session_it_did_not_open_and_leaves_it_open(fake_ray):
    fake_ray.initialized = True
    with ray_session(address="10.0.0.1:6379") as ray:
        assert ray is fake_ray
    assert fake_ray.calls == [] and fake_ray.initialized


def test_local_instance_is_private_and_shut_down(fake_ray):
    with ray_session(num_cpus=3, logging_level="WARNING"):
        pass
    (kind, kwargs), shutdown = fake_ray.calls
    # "local": never an instance someone else started on this machine
    assert kind == "init" and kwargs == {"address": "local", "num_cpus": 3, "include_dashboard": False,
                                         "logging_level": "WARNING"}
    assert shutdown[0] == "shutdown"


def test_state_api_starts_the_dashboard_on_loopback_only_for_a_new_instance(fake_ray):
    # Ray Train releases a stopped run's placement group through the state API the dashboard serves
    with ray_session(num_cpus=2, state_api=True):
        pass
    (_, kwargs), _ = fake_ray.calls
    assert kwargs["include_dashboard"] is True and kwargs["dashboard_host"] == "127.0.0.1"
    with ray_session(address="10.0.0.1:6379", state_api=True):  # a joined cluster's dashboard is its own
        pass
    (_, joined), _ = fake_ray.calls[2:]
    assert "include_dashboard" not in joined and "dashboard_host" not in joined


def test_address_argument_wins_over_ray_address_and_drops_new_instance_settings(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:1")
    with ray_session(address="10.0.0.1:6379", num_cpus=4, object_store_memory=2**28, log_to_driver=False):
        pass
    assert fake_ray.calls[0] == ("init", {"address": "10.0.0.1:6379", "log_to_driver": False})
    assert fake_ray.calls[-1][0] == "shutdown"


def test_ray_address_is_used_when_no_argument(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:1")
    with ray_session():
        pass
    assert fake_ray.calls[0] == ("init", {"address": "10.0.0.2:1"})


def test_shut_down_when_the_block_fails(fake_ray):
    with pytest.raises(RuntimeError):
        with ray_session():
            raise RuntimeError("boom")
    assert fake_ray.calls[-1][0] == "shutdown" and not fake_ray.initialized


def test_loopback_settings_hold_for_the_session_only(fake_ray, tmp_path):
    ray_constants = pytest.importorskip("ray._private.ray_constants")
    before = ray_constants.ENABLE_RAY_CLUSTER
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    with ray_session(address="127.0.0.1:6379"):
        # the head's loopback IP is kept (not rewritten to the node's outward IP)
        assert ray_constants.ENABLE_RAY_CLUSTER is False
    # the token `ray start` wrote is sent: token auth switched on before ray.init ran
    assert fake_ray.seen_env == {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    assert ray_constants.ENABLE_RAY_CLUSTER == before
    assert "RAY_AUTH_MODE" not in os.environ and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


def test_no_token_no_auth_mode_and_remote_addresses_untouched(fake_ray, monkeypatch):
    with ray_session(address="localhost:6379"):
        pass
    assert fake_ray.seen_env == {"RAY_AUTH_MODE": None, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit choice is respected
    with ray_session(address="127.0.0.1:6379"):
        pass
    assert fake_ray.seen_env["RAY_AUTH_MODE"] == "disabled"
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
    with ray_session(address="10.1.2.3:6379"):
        pass
    assert fake_ray.seen_env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] is None


def test_sigterm_inside_the_session_unwinds_like_ctrl_c(fake_ray):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with ray_session():
            signal.raise_signal(signal.SIGTERM)  # delivered to this thread; its handler runs right here
            pytest.fail("SIGTERM did not interrupt the block")
    assert fake_ray.calls[-1][0] == "shutdown"
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_new_local_instance_runs_its_workers_at_the_commands_niceness(fake_ray):
    # Ray's default lowers workers by 15; "0" while Ray starts keeps the command's own priority
    with ray_session(num_cpus=2):
        pass
    assert fake_ray.seen_niceness == "0"
    assert "RAY_worker_niceness" not in os.environ  # only while the instance starts


def test_a_niceness_the_user_chose_is_kept_and_a_joined_cluster_keeps_its_own(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_worker_niceness", "15")
    with ray_session(num_cpus=2):
        pass
    assert fake_ray.seen_niceness == "15" and os.environ["RAY_worker_niceness"] == "15"
    monkeypatch.delenv("RAY_worker_niceness")
    with ray_session(address="10.0.0.1:6379"):  # its workers were started by its own raylet
        pass
    assert fake_ray.seen_niceness is None
