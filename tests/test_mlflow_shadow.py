"""Guard: the repository's ``mlflow/`` folder (server set-ups) must never shadow the real mlflow package.

Python puts the script's directory (or the cwd for ``-c``) first on sys.path;
a regular package ``mlflow/`` there (an ``__init__.py``, or any ``.py`` a tool
might turn into one) would be imported instead of the installed mlflow.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "mlflow"

# find_spec resolves exactly as `import mlflow` would, without paying for the import;
# origin is None for a namespace package (an __init__-less folder winning the lookup)
PROBE = "import importlib.util as u; s = u.find_spec('mlflow'); print(s.origin); print(s.origin is not None)"


def _probe(cwd: Path, extra_path: str | None) -> tuple[Path, bool]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = extra_path
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    location, has_client = out.stdout.split()
    return Path(location).resolve(), has_client == "True"


def test_mlflow_folder_holds_no_python():
    assert FOLDER.is_dir()
    python_files = [p.relative_to(REPO) for p in FOLDER.rglob("*") if p.suffix in (".py", ".pyc", ".pyi", ".so")]
    assert python_files == []
    assert not (FOLDER / "__init__.py").exists()


@pytest.mark.parametrize("extra_path", [None, str(REPO)], ids=["cwd-repo-root", "repo-on-PYTHONPATH"])
def test_import_mlflow_from_repo_root_resolves_to_the_installed_package(extra_path):
    pytest.importorskip("mlflow")
    location, has_client = _probe(REPO, extra_path)
    assert FOLDER.resolve() not in location.parents, f"import mlflow resolved to the repo folder: {location}"
    assert has_client  # a regular package, not the repo folder as a namespace package
    assert location.name == "__init__.py"


def test_packaging_and_lint_treat_mlflow_as_third_party():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    assert include == ["sharp_unlearn*"]
    assert "mlflow" in config["tool"]["ruff"]["lint"]["isort"]["known-third-party"]
