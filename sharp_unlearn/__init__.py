"""sharp-unlearn: sharpness-aware machine unlearning.

The core imports only torch, numpy, scikit-learn, pyarrow, rich and pyyaml;
ray, deepspeed, mlflow, pot and umap are imported lazily where used.
"""
__version__ = "0.1.0"

#: the Python API (sharp_unlearn/api.py), imported on first use so `import sharp_unlearn` stays cheap
_API = ("pretrain", "unlearn", "evaluate", "sweep", "PretrainResult", "UnlearnResult", "EvaluateResult",
        "SweepResult")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from sharp_unlearn import api

        return getattr(api, name)
    raise AttributeError(f"module 'sharp_unlearn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
