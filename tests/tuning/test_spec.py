"""Sweep files (tuning/spec.py): shipped sweeps, validation before Ray starts, objectives, trial configs."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
from tuning.sweep_helpers import TINY, parse, sweep

from sharp_unlearn.errors import ConfigError, MissingExtra
from sharp_unlearn.tuning import Constraint, Objective, parse_sweep
from sharp_unlearn.tuning.spec import resolve_trial_trees, set_path

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------- shipped sweeps
@pytest.mark.parametrize("name", ["smoke", "pretrain_grid", "neggrad_alpha", "sharp_minmax"])
def test_shipped_sweeps_validate(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from sharp_unlearn.tuning import load_sweep

    spec = load_sweep(REPO / "tuning" / f"{name}.yaml")
    assert spec.dims and spec.total_trials >= 1
    if name == "smoke":
        assert spec.total_trials >= 6 and spec.stage == "unlearn"
        cfg = spec.trial_configs({})[1]
        assert cfg.method.name == "sharp_minmax" and cfg.data.label_noise == 0.05
        assert cfg.forget.kind == "memorization" and cfg.forget.scores == "flipped"
    if name == "pretrain_grid":  # SGD, SAM and ASAM at several radii, chained into one unlearning method
        names = {v["name"] for d in spec.dims for v in d.values if isinstance(v, dict) and "name" in v}
        assert names == {"sgd", "sam", "asam"}


# ----------------------------------------------------------------- rejected before Ray starts
@pytest.mark.parametrize("search, needle", [
    ({"optimizer.rhoo": {"uniform": [0.0, 0.1]}}, "'optimizer.rhoo'"),
    ({"method.alhpa": {"grid": [0.9]}}, "'method.alhpa'"),
    ({"nosuch.key": {"grid": [1]}}, "'nosuch'"),
    ({"optimizer.rho.x": {"grid": [1]}}, "is a value, not a section"),
    ({"method.alpha": {"grid": []}}, "empty grid"),
    ({"method.alpha": {"choice": []}}, "empty choice"),
    ({"optimizer.rho": {"uniform": [-0.1, 0.2]}}, "optimizer.rho=-0.1"),
    ({"method.rho_max": {"loguniform": [0.0, 0.2]}}, "loguniform needs low > 0"),
    ({"method.rho_min": {"grid": [0.05, -0.01]}}, "method.rho_min=-0.01"),
    ({"method.alpha": {"uniform": [0.5, 1.5]}}, "method.alpha=1.5"),
    ({"method.alpha": {"normal": [0.5, 0.1]}}, "unknown distribution 'normal'"),
    ({"method.alpha": [0.8, 0.9]}, "is not a distribution"),
    ({"method.alpha": {"uniform": [0.9, 0.8]}}, "needs low < high"),
    ({"method.epochs": {"randint": [3, 3]}}, "is empty"),
    ({"method.name": {"choice": ["neggrad", "nosuch"]}}, "nosuch"),
    ({"data.label_noise": {"grid": [0.0, 0.1]}}, "pretrain.data.label_noise"),
    ({"model.options.width": {"grid": [8, 16]}}, "would change the data or the model"),
    ({"forget.size": {"grid": [10, 20]}}, "one forget set"),
    ({"tracking.enabled": {"grid": [True]}}, "managed by the sweep"),
    ({"pretrain.optimizer.rho": {"grid": [0.1]}}, "targets the pretrain stage"),
    ({"optimizer": {"grid": [{"name": "sam"}, "sgd"]}}, "must be a mapping"),
])
def test_bad_search_space_names_the_key(tmp_path, search, needle):
    with pytest.raises(ConfigError) as info:
        parse(tmp_path, search=search)
    assert needle in str(info.value)
    assert repr(next(iter(search))) in str(info.value)  # the offending key, as written in the file


def test_name_and_storage_precedence(tmp_path):
    raw = sweep(tmp_path, name="from-file")
    assert parse_sweep(raw, tracking={"enabled": False}).name == "from-file"
    spec = parse_sweep(raw, name="from-cli", storage=str(tmp_path / "s"), tracking={"enabled": False})
    assert spec.name == "from-cli" and spec.storage == str(tmp_path / "s")
    raw.pop("name")
    assert parse_sweep(raw, default_name="stem", tracking={"enabled": False}).name == "stem"
    assert parse_sweep(raw, tracking={"enabled": False}).storage == str(tmp_path / "runs" / "sweeps")
    with pytest.raises(ConfigError, match="sweep name 'a b'"):
        parse_sweep(raw, name="a b", tracking={"enabled": False})


def test_relative_paths_are_resolved_for_trials_in_other_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = sweep(tmp_path, forget={"kind": "memorization", "level": "high", "size": 20, "scores": "scores.parquet"})
    raw["base"]["data"]["root"] = "data/digits"
    spec = parse_sweep(raw, tracking={"uri": "sqlite:///rel/m.db?timeout=5"})
    assert spec.pretrain_tree["data"]["root"] == str(tmp_path / "data" / "digits")
    assert spec.unlearn_tree["forget"]["scores"] == str(tmp_path / "scores.parquet")
    assert spec.unlearn_tree["tracking"]["uri"] == f"sqlite:///{tmp_path / 'rel' / 'm.db'}?timeout=5"
    raw["forget"]["scores"] = "flipped"  # a proxy name is not a path
    assert parse_sweep(raw, tracking={"enabled": False}).unlearn_tree["forget"]["scores"] == "flipped"


def test_sharded_trials_are_accepted_and_bad_sharding_is_refused(tmp_path):
    raw = sweep(tmp_path)
    raw["unlearn"]["distributed"] = {"backend": "deepspeed", "zero_stage": 2, "num_workers": 2}
    spec = parse_sweep(raw, tracking={"enabled": False})
    assert spec.unlearn_tree["distributed"]["backend"] == "deepspeed"
    assert spec.unlearn_tree["distributed"]["zero_stage"] == 2
    raw["unlearn"]["distributed"]["zero_stage"] = 5
    with pytest.raises(ConfigError, match="zero_stage"):
        parse_sweep(raw, tracking={"enabled": False})


def test_empty_search_and_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="no search space"):
        parse(tmp_path, search={})
    with pytest.raises(ConfigError, match="unknown key 'serach'"):
        parse(tmp_path, serach={"method.alpha": {"grid": [0.9]}})


def test_stage_both_needs_prefixes_for_shared_sections(tmp_path):
    with pytest.raises(ConfigError, match="ambiguous in stage 'both'.*pretrain.optimizer.rho"):
        parse(tmp_path, stage="both", search={"optimizer.rho": {"grid": [0.05]}})
    spec = parse(tmp_path, stage="both", search={"pretrain.optimizer": {"grid": [{"name": "sgd"},
                                                                                  {"name": "sam", "rho": 0.1}]},
                                                  "unlearn.optimizer.lr": {"grid": [0.01]},
                                                  "method.alpha": {"grid": [0.9, 0.95]}})
    assert [d.target for d in spec.dims] == ["pretrain", "unlearn", "unlearn"]
    assert spec.grid_size == 4
    pre, un = spec.trial_configs({"pretrain.optimizer": {"name": "sam", "rho": 0.1}, "unlearn.optimizer.lr": 0.01,
                                  "method.alpha": 0.95})
    assert (pre.optimizer.name, pre.optimizer.rho, pre.optimizer.lr) == ("sam", 0.1, 0.05)  # merged, not replaced
    assert un.optimizer.lr == 0.01 and un.method.alpha == 0.95
    assert un.optimizer.name == "sam"  # the unlearning config starts from the trial's own pretraining config
    assert un.train.schedule == "constant" and un.forget.size == 20


def test_objective_and_scheduler_validation(tmp_path):
    with pytest.raises(ConfigError, match="'accuracy' is not reported"):
        parse(tmp_path, objective={"metric": "accuracy"})
    with pytest.raises(ConfigError, match="malformed"):
        parse(tmp_path, objective={"constraints": ["test_acc_drop =< 2"]})
    with pytest.raises(ConfigError, match="constraint metric 'test_drop'"):
        parse(tmp_path, objective={"constraints": ["test_drop <= 2"]})
    with pytest.raises(ConfigError, match="scheduler.name='hyperband'"):
        parse(tmp_path, scheduler="hyperband")
    with pytest.raises(ConfigError, match="grace_period=5 exceeds"):
        parse(tmp_path, scheduler={"name": "asha", "grace_period": 5})
    with pytest.raises(ConfigError, match="resources.cpu=0 must be > 0"):
        parse(tmp_path, resources={"cpu": 0})
    with pytest.raises(ConfigError, match="num_samples=0"):
        parse(tmp_path, num_samples=0)
    with pytest.raises(ConfigError, match="test_acc_drop' is not reported by pretrain"):
        parse(tmp_path, stage="pretrain", forget=None, method=None, unlearn=None,
              search={"optimizer.rho": {"grid": [0.05]}}, objective={"constraints": ["test_acc_drop <= 1"]})
    spec = parse(tmp_path, stage="pretrain", forget=None, method=None, unlearn=None,
                 search={"optimizer.rho": {"grid": [0.05]}})
    assert (spec.objective.metric, spec.objective.mode) == ("val_acc", "max")
    spec = parse(tmp_path, objective={"metric": "forget_acc"})
    assert spec.objective.mode == "min"


def test_optuna_missing_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(MissingExtra, match=r"sharp-unlearn\[optuna\]"):
        parse(tmp_path, searcher="optuna")


def test_objective_penalty_and_filter():
    constraint = Constraint("test_acc_drop", "<=", 2.0)
    penalty = Objective("tow", "max", [constraint], "penalty", 0.01)
    assert penalty.score({"tow": 0.9, "test_acc_drop": 1.0}) == {"objective": 0.9, "feasible": 1.0,
                                                                  "constraint_violation": 0.0}
    scored = penalty.score({"tow": 0.9, "test_acc_drop": 7.0})
    assert scored["objective"] == pytest.approx(0.9 - 0.05) and scored["feasible"] == 0.0
    filtered = Objective("tow", "max", [constraint], "filter").score({"tow": 0.9, "test_acc_drop": 7.0})
    assert filtered["objective"] < -1e8
    assert Objective("tow", "max").score({"tow": float("nan")})["objective"] < -1e8  # diverged: worst
    minimize = Objective("forget_acc", "min", [Constraint("retain_acc", ">=", 95.0)], "penalty", 0.1)
    assert minimize.score({"forget_acc": 10.0, "retain_acc": 90.0})["objective"] == pytest.approx(10.5)


def test_set_path_merges_sections_and_replaces_values():
    tree = {"optimizer": {"name": "sgd", "lr": 0.1}, "model": {"options": {"width": 8}}}
    out = set_path(tree, ("optimizer",), {"name": "sam", "rho": 0.2})
    assert out["optimizer"] == {"name": "sam", "lr": 0.1, "rho": 0.2}
    assert set_path(tree, ("model", "options"), {"depth": 2})["model"]["options"] == {"depth": 2}
    assert set_path(tree, ("method", "alpha"), 0.5)["method"] == {"alpha": 0.5}
    assert tree["optimizer"] == {"name": "sgd", "lr": 0.1}  # the base is never modified


def test_resolve_trial_trees_applies_only_sampled_keys(tmp_path):
    spec = parse(tmp_path, search={"method.alpha": {"grid": [0.8, 0.9]}, "optimizer.name": {"choice": ["sgd", "sam"]}})
    _, un = resolve_trial_trees(spec.stage, spec.dims, {"method.alpha": 0.8, "optimizer.name": "sam"},
                                spec.pretrain_tree, spec.unlearn_tree, spec.unlearn_overrides)
    assert un["method"]["alpha"] == 0.8 and un["optimizer"]["name"] == "sam" and un["optimizer"]["lr"] == 0.02
    assert spec.max_epochs() == 3 and spec.total_trials == 2


@pytest.mark.slow
def test_config_shape_and_an_existing_checkpoint(tmp_path):
    from sharp_unlearn.config import config_from_dict
    from sharp_unlearn.recipes.pretrain import train_from_scratch

    pre = config_from_dict({**copy.deepcopy(TINY), "output_dir": str(tmp_path / "pre"),
                            "tracking": {"enabled": False}})
    checkpoint = train_from_scratch(pre, quiet=True).checkpoint
    unlearning = {"optimizer": {"name": "sam", "lr": 0.01, "rho": 0.1},
                  "forget": {"kind": "random", "size": 20}, "method": {"name": "neggrad", "epochs": 2}}
    spec = parse_sweep({"stage": "unlearn", "config": unlearning, "pretrain": {"checkpoint": str(checkpoint)},
                        "output_dir": str(tmp_path / "runs"), "search": {"method.alpha": {"grid": [0.9]}}},
                       tracking={"enabled": False})
    assert spec.checkpoint == str(checkpoint) and spec.pretrain_tree is None
    _, cfg = spec.trial_configs({"method.alpha": 0.9})
    assert (cfg.optimizer.name, cfg.optimizer.rho, cfg.method.alpha) == ("sam", 0.1, 0.9)
    assert cfg.model.options == {"width": 8, "feature_dim": 32} and cfg.data.label_noise == 0.05  # the checkpoint's
    assert cfg.train.epochs == 3  # inherited from the checkpoint's recipe, as `sharp-unlearn unlearn` does

    demo_shape = parse_sweep({"stage": "unlearn", "checkpoint": str(checkpoint), "forget": unlearning["forget"],
                              "method": unlearning["method"], "output_dir": str(tmp_path / "runs"),
                              "search": {"optimizer.rho": {"grid": [0.05]}}}, tracking={"enabled": False})
    assert demo_shape.trial_configs({"optimizer.rho": 0.05})[1].optimizer.name == "sgd"

    recipe = parse_sweep({"stage": "unlearn", "config": {**copy.deepcopy(TINY), **unlearning},
                          "pretrain": {"optimizer": {"name": "asam", "rho": 1.0}, "train": {"epochs": 4}},
                          "output_dir": str(tmp_path / "runs"), "search": {"method.alpha": {"grid": [0.9]}}},
                         tracking={"enabled": False})
    pre_cfg = config_from_dict(recipe.pretrain_tree)
    assert (pre_cfg.optimizer.name, pre_cfg.optimizer.rho, pre_cfg.train.epochs) == ("asam", 1.0, 4)
    assert pre_cfg.model.options == {"width": 8, "feature_dim": 32}
    with pytest.raises(ConfigError, match="either `config`"):
        parse_sweep({"config": unlearning, "base": TINY, "search": {"method.alpha": {"grid": [0.9]}}})
    with pytest.raises(ConfigError, match="needs a pretrained model"):
        parse_sweep({"stage": "unlearn", "forget": unlearning["forget"], "method": unlearning["method"],
                     "search": {"method.alpha": {"grid": [0.9]}}}, tracking={"enabled": False})
