"""Ray Tune sweeps, split by concern (``sharp_unlearn.tune`` is the public entry point).

- ``spec``: sweep files -> validated SweepSpec (no Ray import);
- ``trial_state``: what every trial shares (inputs, ledger, per-epoch reporter, cache lock);
- ``trainables``: what a single-device trial runs, and Ray's session;
- ``sharded``: trials that are DeepSpeed ZeRO jobs;
- ``runs``, ``callback``: the MLflow parent/child run tree;
- ``runner``: shared inputs, Ray start/stop, Tuner/restore, best trial, tables.

(The top-level ``tuning/`` folder of the repository holds the sweep YAML files.)
"""
