"""Shared fixtures. Tests mirror the package: tests/data, tests/engine, tests/methods, ...

Integration tests (real MLflow server, Ray cluster, DeepSpeed processes) live
in tests/integration and carry the ``integration`` / ``distributed`` markers.
"""
from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolate_tracking(monkeypatch, tmp_path):
    """Never write ./mlruns.db from a test: default tracking goes to the test's tmp dir."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    yield


@pytest.fixture
def small_cfg(tmp_path):
    """A fast digits config (tracking off) to build on with ``load_config(overrides=...)``."""
    from sharp_unlearn.config import load_config

    def make(*overrides: str):
        base = [f"output_dir={tmp_path / 'runs'}", "tracking.enabled=false", "train.epochs=2",
                "data.batch_size=64", "model.name=small_cnn", "model.options={width: 8, feature_dim: 32}"]
        return load_config([], base + list(overrides))

    return make


@pytest.fixture
def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


os.environ.setdefault("PYTHONHASHSEED", "0")
