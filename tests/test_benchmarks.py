"""Every benchmark script imports: they are not run by the suite (they measure, and take minutes), so
a renamed or removed project name they use would otherwise surface only when someone runs them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def test_benchmarks_are_found():
    assert len(BENCHMARKS) >= 5, BENCHMARKS


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_imports_and_has_a_main_guard(script, monkeypatch):
    name = f"benchmark_{script.stem}"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)  # ImportError here: the script uses a name the package no longer has
    assert callable(getattr(module, "main", None)), f"{script.name} has no main()"
    assert 'if __name__ == "__main__"' in script.read_text(), f"{script.name} would run when imported"
