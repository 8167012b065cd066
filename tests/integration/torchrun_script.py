"""Run a test file's own worker (its ``__main__``) on two gloo ranks under torchrun.

The ZeRO equivalence tests launch themselves once per module: the worker writes a JSON
file of results that the parametrized tests then read.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from sharp_unlearn.recipes.distributed import torchrun_command


def run_script(script: str, out: Path, *args: str, timeout: float) -> Any:
    """``torchrun`` 2 ranks of ``script out *args``; returns the JSON it wrote to ``out``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run([*torchrun_command(2), script, str(out), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {Path(script).name} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(Path(out).read_text())
