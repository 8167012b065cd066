"""`sharp-unlearn sweep` (commands/sweep.py): bad input exits 2 before Ray starts or anything is written."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from tuning.sweep_helpers import sweep


def _write(tmp_path, raw) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("search, needle", [
    ({"optimizer.rhoo": {"uniform": [0.0, 0.1]}}, "optimizer.rhoo"),
    ({"method.alpha": {"grid": []}}, "empty grid"),
    ({"optimizer.rho": {"uniform": [-0.5, 0.1]}}, "optimizer.rho=-0.5"),
])
def test_cli_rejects_bad_input_before_ray_starts(tmp_path, capsys, search, needle):
    from sharp_unlearn.cli import main

    path = _write(tmp_path, sweep(tmp_path, search=search))
    storage = tmp_path / "storage"
    code = main(["sweep", str(path), "--storage", str(storage), "--num-cpus", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not storage.exists() and not (tmp_path / "runs").exists()  # nothing trained, nothing started
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_cli_rejects_resume_of_unknown_sweep_and_bad_flags(tmp_path, capsys):
    from sharp_unlearn.cli import main

    path = _write(tmp_path, sweep(tmp_path))
    assert main(["sweep", str(path), "--max-concurrent", "0"]) == 2
    assert "--max-concurrent=0" in capsys.readouterr().err
    assert main(["sweep", str(path), "--resume", "--num-samples", "3"]) == 2
    assert "--num-samples cannot change" in capsys.readouterr().err
    assert main(["sweep", str(path), "--num-cpus", "1", "resources.cpu=2"]) == 2
    assert "exceeds this machine's 1 CPUs" in capsys.readouterr().err
    assert main(["sweep", str(path), "--resume", "--storage", str(tmp_path / "nothing-here")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
