"""The repository's own folders: tuning/ and cluster/ hold no Python, and what ships to a Ray cluster
(cluster/runtime_env.yaml's excludes) leaves out the MLflow server set-up, runs and tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_no_python_in_top_level_tuning_and_cluster_folders():
    for folder in ("tuning", "cluster"):
        assert not list((REPO / folder).rglob("*.py")), f"{folder}/ must hold no Python (it is not a package)"


def test_runtime_env_packaging_leaves_out_mlflow(tmp_path):
    """Pack a working directory with Ray's own packager and cluster/runtime_env.yaml's excludes."""
    import zipfile

    pytest.importorskip("ray")
    from ray._private.runtime_env.packaging import create_package

    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    work = tmp_path / "repo"
    files = ["sharp_unlearn/__init__.py", "sharp_unlearn/tracking.py", "sharp_unlearn/tuning/runs.py",
             "tuning/smoke.yaml", "pyproject.toml", "mlflow/README.md", "mlflow/.env", "mlflow/docker-compose.yml",
             "runs/pretrain/x/checkpoint.pt", "mlruns.db", "tests/test_x.py"]
    for name in files:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("x")
    target = tmp_path / "pkg.zip"
    create_package(str(work), target, include_gitignore=False, excludes=env["excludes"])
    shipped = set(zipfile.ZipFile(target).namelist())
    assert {"sharp_unlearn/__init__.py", "sharp_unlearn/tracking.py", "sharp_unlearn/tuning/runs.py",
            "tuning/smoke.yaml", "pyproject.toml"} <= shipped
    assert not any(n.startswith("mlflow/") for n in shipped), shipped
    assert not any(n.startswith(("runs/", "tests/")) or n.endswith(".db") for n in shipped), shipped
