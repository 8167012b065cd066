"""Ray Tune sweeps, split by concern (``sharp_unlearn.tune`` is the public entry point).

- ``spec``: sweep files -> validated SweepSpec (no Ray import);
- ``trainables``: what a trial runs and reports;
- ``runs``, ``callback``: the MLflow parent/child run tree;
- ``runner``: shared inputs, Ray start/stop, Tuner/restore, best trial, tables.

(The top-level ``tuning/`` folder of the repository holds the sweep YAML files.)
"""
