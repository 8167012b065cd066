"""SIGTERM / Ctrl-C end a CLI command as an interruption (exit 130, one last "interrupted" line),
whatever handler a library installed meanwhile and whatever the unwinding raises.

Ray does all of these in real runs: ``ray.init`` replaces the SIGTERM handler with one calling
``sys.exit(15)``; Ray Tune / Ray Train take SIGINT; a cancelled task raises RayTaskError while the
driver unwinds. Here they are imitated in-process (fast); tests/integration/test_interrupt_ray.py
sends real signals to real Ray-backed commands.
"""
from __future__ import annotations

import os
import signal
import sys

import pytest

from sharp_unlearn import cli
from sharp_unlearn.commands.memorization import Memorization
from sharp_unlearn.errors import termination_requested, watch_termination


def _signal_self(signum: int) -> None:
    """Deliver ``signum`` to this process and let Python run its handler before returning."""
    os.kill(os.getpid(), signum)
    signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a C call: pending Python handlers run right after it


@pytest.fixture
def command(monkeypatch):
    """Replace what `sharp-unlearn memorization` does with the given function."""
    def install(fn):
        monkeypatch.setattr(Memorization, "run", lambda self, args: fn())
    return install


@pytest.fixture(autouse=True)
def _handlers_restored():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    yield
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert signal.set_wakeup_fd(-1) == -1  # no wakeup fd left behind


def _last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_sigterm_unwinds_finally_blocks_and_exits_130(command, capsys):
    cleaned = []

    def run():
        try:
            _signal_self(signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt the command")
        finally:
            cleaned.append(True)

    command(run)
    assert cli.main(["memorization"]) == 130
    assert cleaned == [True]
    assert _last_line(capsys) == "sharp-unlearn memorization: interrupted"


def test_sigterm_reaching_a_library_handler_that_calls_sys_exit_is_an_interruption(command, capsys):
    def run():  # what ray.init does to the driver
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        _signal_self(signal.SIGTERM)

    command(run)
    assert cli.main(["memorization"]) == 130
    assert _last_line(capsys) == "sharp-unlearn memorization: interrupted"


def test_error_raised_after_a_library_swallowed_the_signal_is_an_interruption(command, capsys):
    def run():  # Ray Tune / Train: SIGINT only sets a flag; then a cancelled task's error surfaces
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        _signal_self(signal.SIGINT)
        raise RuntimeError("RayTaskError(TaskCancelledError): task was cancelled")

    command(run)
    assert cli.main(["memorization"]) == 130
    assert _last_line(capsys) == "sharp-unlearn memorization: interrupted"


def test_second_sigterm_while_unwinding_still_exits_130(command, capsys):
    def run():
        try:
            _signal_self(signal.SIGTERM)
        finally:
            try:
                _signal_self(signal.SIGTERM)  # the scheduler insists while Ray shuts down
            finally:
                raise RuntimeError("Ray core worker died while stopping")

    command(run)
    assert cli.main(["memorization"]) == 130
    assert _last_line(capsys) == "sharp-unlearn memorization: interrupted"


def test_an_error_without_any_signal_is_still_a_failure(command, capsys):
    def interrupted():
        _signal_self(signal.SIGTERM)

    command(interrupted)
    assert cli.main(["memorization"]) == 130
    capsys.readouterr()

    def failing():  # the note of the earlier interruption does not leak into the next command
        raise RuntimeError("boom")

    command(failing)
    assert cli.main(["memorization"]) == 1
    assert _last_line(capsys) == "sharp-unlearn memorization: failed: RuntimeError: boom"


def test_watch_termination_notes_signals_whichever_python_handler_runs():
    with watch_termination():
        assert not termination_requested()
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a foreign handler that notes nothing
        _signal_self(signal.SIGTERM)
        assert termination_requested()
    with watch_termination():
        assert not termination_requested()


def test_sigterm_dropped_inside_ray_init_still_interrupts(command, capsys):
    """A SIGTERM during ``ray.init`` can run Ray's handler in an at-fork callback, where its
    SystemExit is printed and dropped; the command must not carry on as if nothing happened."""
    from sharp_unlearn.errors import init_ray

    class FakeRay:
        @staticmethod
        def init(**kwargs):
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init installs
            try:
                _signal_self(signal.SIGTERM)
            except SystemExit:  # "Exception ignored in: <function _releaseLock ...>"
                pass

    carried_on = []

    def run():
        init_ray(FakeRay, num_cpus=1)
        carried_on.append(True)

    command(run)
    assert cli.main(["memorization"]) == 130
    assert carried_on == []
    assert _last_line(capsys) == "sharp-unlearn memorization: interrupted"
