"""`task: lm` sweeps (tuning/lm.py): the shipped file validates, bad keys are refused before Ray starts,
and one trial (no Ray: a list stands in for Tune's report) reports every epoch against the reference."""
from __future__ import annotations

from pathlib import Path

import pytest

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.tuning import load_sweep
from sharp_unlearn.tuning.lm import LM_METRICS, lm_trial, load_lm_sweep, parse_lm_sweep, prepare_lm_inputs

REPO = Path(__file__).resolve().parents[2]
TINY_LM = {"subjects": 8, "forget_size": 0.2, "heldout_fraction": 0.2, "n_embd": 16, "n_layer": 1,
           "pretrain_epochs": 4, "unlearn_epochs": 2, "threads": 1}


def raw_sweep(tmp_path, **changes):
    raw = {"task": "lm", "name": "tiny", "lm": dict(TINY_LM), "output_dir": str(tmp_path / "runs"),
           "method": {"name": "sharp_minmax", "alpha": 0.5, "mask_fraction": 0.5},
           "search": {"method.alpha": {"grid": [0.3, 0.7]}, "lm.rho": {"loguniform": [0.01, 0.1]}},
           "objective": {"metric": "forget_quality", "constraints": ["model_utility >= 0.1"]},
           "scheduler": {"name": "asha", "grace_period": 1}}
    raw.update(changes)
    return raw


def test_shipped_lm_sweep_validates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_lm_sweep(REPO / "tuning" / "lm_sharp_minmax.yaml")
    assert spec.method["name"] == "sharp_minmax" and spec.total_trials == 16
    assert {"lm.rho", "method.rho_max", "method.lamb_min", "method.lamb_max", "method.alpha",
            "method.mask_fraction"} == set(spec.keys)
    assert spec.objective.metric == "forget_quality" and spec.objective.mode == "max"
    assert spec.scheduler.name == "asha" and spec.max_epochs() == 5
    with pytest.raises(ConfigError, match="task: lm"):  # the image sweep loader points to the LM one
        load_sweep(REPO / "tuning" / "lm_sharp_minmax.yaml")


@pytest.mark.parametrize("change, needle", [
    ({"search": {"lm.subjects": {"grid": [4, 8]}}}, "shares one pretrained model"),
    ({"search": {"method.alhpa": {"grid": [0.5]}}}, "method.alhpa is not a setting of 'sharp_minmax'"),
    ({"search": {"method.rho_max": {"uniform": [-0.1, 0.1]}}}, "'method.rho_max': value -0.1 is invalid"),
    ({"search": {"method.alpha": {"uniform": [0.1]}}}, "needs [low, high]"),
    ({"objective": {"metric": "tow_acc"}}, "not reported by LM trials"),
    ({"objective": {"metric": "tow", "constraints": ["test_acc_drop <= 2"]}}, "constraint metric 'test_acc_drop'"),
    ({"method": {"name": "nosuch"}}, "method.name='nosuch'"),
    ({"optimizer": "lion"}, "optimizer='lion'"),
    ({"lm": {"subjectz": 3}}, "subjectz"),
    ({"stage": "unlearn"}, "unknown key 'stage'"),
])
def test_bad_lm_sweeps_are_refused_before_ray(tmp_path, change, needle):
    with pytest.raises(ConfigError) as info:
        parse_lm_sweep(raw_sweep(tmp_path, **change))
    assert needle in str(info.value)


@pytest.mark.slow
def test_one_lm_trial_reports_every_epoch_against_the_shared_reference(tmp_path):
    spec = parse_lm_sweep(raw_sweep(tmp_path))
    inputs = prepare_lm_inputs(spec, log=lambda *_: None)
    assert Path(inputs.pretrained_path).is_file()
    reports = []
    last = lm_trial(inputs, {"method.alpha": 0.7, "lm.rho": 0.05}, reports.append)
    assert [r["epoch"] for r in reports] == [1, 2] and last == reports[-1]
    for report in reports:
        assert set(LM_METRICS) <= set(report) and {"objective", "feasible", "epochs_planned"} <= set(report)
        assert 0.0 <= report["forget_quality"] <= 1.0
    assert reports[0] != reports[1]  # the model kept unlearning between the reports
    # the same sampled values give the same numbers (a retried trial reports what it did the first time)
    again = []
    lm_trial(inputs, {"method.alpha": 0.7, "lm.rho": 0.05}, again.append)
    assert again == reports
    other = []
    lm_trial(inputs, {"method.alpha": 0.3, "lm.rho": 0.05}, other.append)
    assert other != reports  # the sampled value reached the method
