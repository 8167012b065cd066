"""A real `task: lm` sweep on a local Ray instance (2 CPUs, not local mode): `sharp-unlearn sweep` runs
2 tiny trials of Sharp MinMax on the LM demo's tiny GPT under ASHA and writes their table."""
from __future__ import annotations

import json

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.distributed]

ray = pytest.importorskip("ray")
pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _no_ray_left_behind():
    yield
    if ray.is_initialized():  # a failed test must not leave its Ray instance to the next one
        ray.shutdown()


def test_lm_sweep_of_two_tiny_trials_on_ray(tmp_path, capsys):
    from sharp_unlearn.cli import main

    raw = {"task": "lm", "name": "lm_tiny", "output_dir": str(tmp_path / "runs"),
           "lm": {"subjects": 8, "forget_size": 0.2, "heldout_fraction": 0.2, "n_embd": 16, "n_layer": 1,
                  "pretrain_epochs": 4, "unlearn_epochs": 2, "threads": 1},
           "method": {"name": "sharp_minmax", "alpha": 0.5, "mask_fraction": 0.5},
           "search": {"method.alpha": {"grid": [0.3, 0.7]}},
           "objective": {"metric": "forget_quality"},
           "scheduler": {"name": "asha", "grace_period": 1}, "resources": {"cpu": 1}}
    path = tmp_path / "lm_tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["sweep", str(path), "--num-cpus", "2", "--storage", str(tmp_path / "storage")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "sweep lm_tiny: task lm" in out and "best trial" in out
    results = json.loads((tmp_path / "runs" / "lm_sweeps" / "lm_tiny" / "results.json").read_text())
    rows = results["rows"]
    assert sorted(r["method.alpha"] for r in rows) == [0.3, 0.7]
    assert all(r["error"] is None and r["epochs"] >= 1 and 0.0 <= r["forget_quality"] <= 1.0 for r in rows)
    assert any(r["epochs"] == 2 for r in rows)  # ASHA lets at least the better one finish
    assert results["best"]["trial_id"] in {r["trial_id"] for r in rows}
    assert (tmp_path / "runs" / "lm_sweeps" / "lm_tiny" / "results.md").is_file()
