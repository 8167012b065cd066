"""progress.stdout_to_stderr: what a library prints while a ``--json`` command runs stays off stdout."""
from __future__ import annotations

import os
import subprocess
import sys

from sharp_unlearn.progress import stdout_to_stderr


def test_stdout_to_stderr_moves_prints_descriptor_writes_and_children_then_restores(capfd):
    print("before", flush=True)
    with stdout_to_stderr():
        print("python print", flush=True)
        os.write(1, b"descriptor write\n")
        subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
    print("after", flush=True)
    out, err = capfd.readouterr()
    assert out == "before\nafter\n"
    assert "python print" in err and "descriptor write" in err and "child process" in err


def test_stdout_is_restored_when_the_block_raises(capfd):
    try:
        with stdout_to_stderr():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    print("json document", flush=True)
    assert capfd.readouterr().out == "json document\n"
