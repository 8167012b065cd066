"""errors.handle_sigterm: the one way a block changes what SIGTERM does."""
import signal
import threading

import pytest

from sharp_unlearn.errors import Terminated, handle_sigterm, termination_requested


@pytest.fixture(autouse=True)
def _restore_sigterm():
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.fixture(autouse=True)
def _forget_termination(monkeypatch):
    """A SIGTERM noted here must not read as an interruption in later tests (init_ray checks it)."""
    from sharp_unlearn import errors

    monkeypatch.setitem(errors._termination, "requested", False)


def test_default_unwinds_like_ctrl_c_and_restores_the_previous_handler():
    seen = []
    signal.signal(signal.SIGTERM, lambda *a: seen.append("outer"))
    outer = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with handle_sigterm() as previous:
            assert previous is outer
            signal.raise_signal(signal.SIGTERM)
            pytest.fail("SIGTERM did not interrupt the block")
    assert termination_requested()
    assert signal.getsignal(signal.SIGTERM) is outer
    signal.raise_signal(signal.SIGTERM)
    assert seen == ["outer"]


def test_ignore_holds_sigterm_off_for_the_block():
    with handle_sigterm(signal.SIG_IGN):
        signal.raise_signal(signal.SIGTERM)  # would end the process with the default handler
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN


def test_outside_the_main_thread_it_changes_nothing():
    before = signal.getsignal(signal.SIGTERM)
    result = {}

    def worker():
        with handle_sigterm(signal.SIG_IGN) as previous:
            result["previous"] = previous
            result["inside"] = signal.getsignal(signal.SIGTERM)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert result == {"previous": None, "inside": before}
