"""The Python API: lazy imports, settings as keyword arguments or a config object, tracking off by
default, and the README's example run as written."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sharp_unlearn.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_importing_the_package_stays_cheap(tmp_path):
    proc = _run("import sys, sharp_unlearn\n"
                "assert 'torch' not in sys.modules and 'sharp_unlearn.api' not in sys.modules\n"
                "from sharp_unlearn import pretrain, unlearn, evaluate, sweep, PretrainResult\n"
                "assert callable(pretrain) and 'torch' not in sys.modules\n"
                "print('ok')", tmp_path, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    import sharp_unlearn

    with pytest.raises(AttributeError, match="no attribute 'pretrian'"):
        sharp_unlearn.pretrian  # noqa: B018


def test_settings_become_typed_overrides():
    from sharp_unlearn.api import _overrides, _resolve
    from sharp_unlearn.config import load_config

    assert _overrides({"optimizer": {"name": "sam", "rho": 0.05}, "train.epochs": 2, "model": "mlp",
                       "data": {"options": {"d": 3}}}) == [
        'optimizer.name="sam"', "optimizer.rho=0.05", "train.epochs=2", 'model.name="mlp"',
        'data.options={"d": 3}']
    cfg = _resolve(None, {"optimizer": {"name": "sam", "rho": 0.1}, "train.epochs": 3, "seed": 7,
                          "forget": {"kind": "class", "classes": [3, 4]}}, tracking=False)
    assert (cfg.optimizer.name, cfg.optimizer.rho, cfg.train.epochs, cfg.seed) == ("sam", 0.1, 3, 7)
    assert cfg.forget.classes == [3, 4] and cfg.tracking.enabled is False
    # a config object, then keyword arguments on top; tracking only when asked for
    base = load_config([], ["optimizer.name=asam", "train.epochs=9"])
    cfg = _resolve(base, {"train.epochs": 1}, tracking="sqlite:///elsewhere.db")
    assert (cfg.optimizer.name, cfg.train.epochs) == ("asam", 1)
    assert cfg.tracking.enabled is True and cfg.tracking.uri == "sqlite:///elsewhere.db"
    assert _resolve({"seed": 4}, {}, tracking=True).seed == 4


def test_bad_settings_raise_config_error():
    from sharp_unlearn.api import _resolve

    with pytest.raises(ConfigError, match="optimizer.rhoo"):
        _resolve(None, {"optimizer": {"rhoo": 0.1}}, tracking=False)
    with pytest.raises(ConfigError, match="'lbfgs'"):
        _resolve(None, {"optimizer": "lbfgs"}, tracking=False)
    with pytest.raises(ConfigError, match="tracking=3"):
        _resolve(None, {}, tracking=3)
    with pytest.raises(ConfigError, match="grid spec"):
        _resolve("demo_digits", {}, tracking=False)


def _readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README.md has no python block under '## Python API'"
    return blocks[0]


def test_readme_example_is_short():
    lines = [line for line in _readme_example().splitlines() if line.strip()]
    assert len(lines) <= 12, len(lines)


@pytest.mark.slow  # trains a small CNN, its retrained reference and an unlearning run (~1 min on 2 cores)
def test_readme_example_runs_as_written(tmp_path):
    code = _readme_example()
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"test accuracy \d+\.\d\d, checkpoint runs/api/pretrain/.+checkpoint\.pt", out), out
    tow = float(re.search(r"ToW (\d\.\d{4})", out).group(1))
    assert 0.0 < tow <= 1.0
    assert re.search(r"MIA efficacy \d\.\d{4}, table .+results\.parquet", out), out
    assert (tmp_path / "runs" / "api").is_dir()
    # tracking was not asked for: no MLflow store appeared anywhere under the working directory
    assert not [p for p in tmp_path.rglob("*") if p.name in ("mlruns.db", "mlruns")]
