"""Bad input of every kind, as a user meets it: a real `sharp-unlearn` process.

Each case asserts the whole promise: exit code 2, exactly one line on stderr that
names the bad value, no traceback, and nothing written (no run folder, no
half-written file, the user's files untouched).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMALL = ["model.options={width: 8, feature_dim: 32}"]


def run_cli(args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "sharp_unlearn", *args], cwd=cwd, capture_output=True,
                          text=True, env=full_env, timeout=timeout)


def assert_exit_2_one_line(proc: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """Exit 2, one stderr line `sharp-unlearn COMMAND: error: ...` holding every needle; returns it."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith(f"sharp-unlearn {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folder`` with its size and mtime: compare before/after for 'nothing written'."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}

