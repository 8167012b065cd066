"""sharp-unlearn: sharpness-aware machine unlearning.

The core imports only torch, numpy, scikit-learn, pyarrow, rich and pyyaml;
ray, deepspeed, mlflow, pot and umap are imported lazily where used.
"""
__version__ = "0.1.0"
