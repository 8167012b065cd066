"""Sweeps search over SAM's cheaper variants like any other key (issue #19)."""
from __future__ import annotations

import pytest
from tuning.sweep_helpers import parse

from sharp_unlearn.errors import ConfigError

VARIANT_SEARCH = {"optimizer.sam_every": {"grid": [1, 2, 4]},
                  "optimizer.sam_fraction": {"uniform": [0.1, 1.0]},
                  "optimizer.sam_subset": {"choice": ["random", "saliency"]},
                  "method.sam_sides": {"grid": ["both", "forget", "retain"]}}


def test_a_sweep_over_variant_keys_parses_and_builds_trial_configs(tmp_path):
    spec = parse(tmp_path, method={"name": "sharp_minmax", "epochs": 2, "alpha": 0.9}, search=VARIANT_SEARCH)
    assert set(spec.keys) >= set(VARIANT_SEARCH) and spec.grid_size == 9
    _, cfg = spec.trial_configs({"optimizer.sam_every": 4, "optimizer.sam_fraction": 0.3,
                                 "optimizer.sam_subset": "saliency", "method.sam_sides": "forget"})
    assert (cfg.optimizer.sam_every, cfg.optimizer.sam_fraction, cfg.optimizer.sam_subset) == (4, 0.3, "saliency")
    assert cfg.method.sam_sides == "forget"


@pytest.mark.parametrize("search, needle", [
    ({"optimizer.sam_every": {"grid": [1, 0]}}, "optimizer.sam_every=0"),
    ({"optimizer.sam_fraction": {"uniform": [0.0, 0.5]}}, "optimizer.sam_fraction=0.0"),
    ({"method.sam_sides": {"choice": ["both", "none"]}}, "method.sam_sides='none'"),
])
def test_bad_variant_values_in_a_search_space_are_rejected_before_ray(tmp_path, search, needle):
    with pytest.raises(ConfigError) as info:
        parse(tmp_path, method={"name": "sharp_minmax", "epochs": 2, "alpha": 0.9}, search=search)
    assert needle in str(info.value) and repr(next(iter(search))) in str(info.value)


def test_a_sharded_sweep_searches_over_variant_keys(tmp_path):
    unlearn = {"optimizer": {"lr": 0.02}, "train": {"schedule": "constant"},
               "distributed": {"backend": "deepspeed", "zero_stage": 3, "num_workers": 2}}
    spec = parse(tmp_path, method={"name": "sharp_minmax", "epochs": 2, "alpha": 0.9}, unlearn=unlearn,
                 search={"optimizer.sam_every": {"grid": [1, 2, 4]},
                         "optimizer.sam_fraction": {"choice": [0.5, 1.0]},
                         "optimizer.sam_subset": {"choice": ["random", "saliency"]}})
    assert spec.sharded is not None and spec.sharded.zero_stage == 3 and spec.grid_size == 3
    _, cfg = spec.trial_configs({"optimizer.sam_every": 2, "optimizer.sam_fraction": 0.5,
                                 "optimizer.sam_subset": "saliency"})
    assert cfg.distributed.backend == "deepspeed" and cfg.distributed.zero_stage == 3
    assert (cfg.optimizer.sam_every, cfg.optimizer.sam_fraction, cfg.optimizer.sam_subset) == (2, 0.5, "saliency")
