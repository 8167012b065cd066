"""Ray Tune sweeps over SAM radii, min/max weights, alpha, mask fraction, learning rates, epochs.

Public entry points::

    from sharp_unlearn.tuning import load_sweep, run_sweep
    spec = load_sweep("tuning/smoke.yaml")          # validated before Ray starts (ConfigError)
    outcome = run_sweep(spec, num_cpus=2)            # rows, best trial, MLflow parent run id

The sweep file format is documented in ``tuning/README.md`` (the top-level ``tuning/`` folder of
the repository holds the sweep YAML files). The modules here, split by concern:

- ``spec``: sweep files -> validated SweepSpec (no Ray import);
- ``trial_state``: what every trial shares (inputs, ledger, per-epoch reporter, cache lock);
- ``trainables``: what a single-device trial runs, and Ray's session;
- ``sharded``: trials that are DeepSpeed ZeRO jobs;
- ``runs``, ``callback``: the MLflow parent/child run tree;
- ``runner``: shared inputs, Ray start/stop, Tuner/restore, best trial, tables.
"""
from sharp_unlearn.tuning.runner import SweepInterrupted, SweepOutcome, pick_best, prepare_inputs, run_sweep
from sharp_unlearn.tuning.spec import (
                                       DISTRIBUTIONS,
                                       SCHEDULERS,
                                       SEARCHERS,
                                       STAGES,
                                       Constraint,
                                       Dimension,
                                       Objective,
                                       SweepSpec,
                                       load_sweep,
                                       parse_sweep,
)
from sharp_unlearn.tuning.trainables import run_trial
from sharp_unlearn.tuning.trial_state import LocalSession, TrialInputs, trial_configs

__all__ = ["DISTRIBUTIONS", "SCHEDULERS", "SEARCHERS", "STAGES", "Constraint", "Dimension", "LocalSession",
           "Objective", "SweepInterrupted", "SweepOutcome", "SweepSpec", "TrialInputs", "load_sweep", "parse_sweep",
           "pick_best", "prepare_inputs", "run_sweep", "run_trial", "trial_configs"]
