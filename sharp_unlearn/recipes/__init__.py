"""Runnable recipes built from the library parts: pretrain, retrain, unlearn, demo.

The CLI, Ray Tune trials and notebooks all call these functions with a typed config.
"""
