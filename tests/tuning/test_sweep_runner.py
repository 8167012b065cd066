"""The sweep runner (tuning/runner.py) outside Ray: which trial is the best."""
from __future__ import annotations

from tuning.sweep_helpers import parse

from sharp_unlearn.tuning import pick_best


def test_pick_best_prefers_complete_feasible_trials(tmp_path):
    spec = parse(tmp_path)
    rows = [
        {"trial_id": "a", "status": "TERMINATED", "stopped_early": True, "diverged": False, "feasible": True,
         "objective": 0.99, "method.alpha": 0.8},
        {"trial_id": "b", "status": "TERMINATED", "stopped_early": False, "diverged": False, "feasible": True,
         "objective": 0.90, "method.alpha": 0.9},
        {"trial_id": "c", "status": "TERMINATED", "stopped_early": False, "diverged": False, "feasible": True,
         "objective": 0.95, "method.alpha": 0.95},
        {"trial_id": "d", "status": "ERROR", "stopped_early": False, "diverged": False, "feasible": True,
         "objective": 0.999, "method.alpha": 0.97},
        {"trial_id": "e", "status": "TERMINATED", "stopped_early": False, "diverged": True, "feasible": False,
         "objective": -1e9, "method.alpha": 0.5},
    ]
    assert pick_best(spec, rows)["trial_id"] == "c"
    assert pick_best(spec, [rows[0], rows[3]])["trial_id"] == "a"  # none complete: the best finished one
    assert pick_best(spec, [rows[3], rows[4]]) is None
