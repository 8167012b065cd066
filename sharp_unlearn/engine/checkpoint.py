"""Atomic checkpoints, loaded with ``weights_only=True``.

A checkpoint is written to a temporary file in the target directory, flushed
to disk, then renamed over the target: a crash mid-write leaves the previous
checkpoint intact. Every checkpoint carries the config hash and the split
hash so a cached retrain reference is reused only when both match.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.files import atomic_path
from sharp_unlearn.models.base import load_model_state  # noqa: F401  (its home is the model layer)

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **payload}
    # an interrupted write leaves the old checkpoint (or none), never half of one
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(payload, handle)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated or not a torch file
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text:
            # torch's own message advises reloading with weights_only=False, i.e. running whatever
            # code the file carries: never pass that on for a file we cannot vouch for
            reason = "not a torch file, or it holds objects other than tensors and plain data"
        else:
            first = text.splitlines()[0].split(". ")[0] if text else ""  # torch appends paragraphs of advice
            reason = f"{type(exc).__name__}: {first}"
        raise ConfigError(f"checkpoint {str(path)!r} cannot be read ({reason}); "
                          "expected a checkpoint written by sharp-unlearn") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise ConfigError(f"checkpoint {str(path)!r} is not a sharp-unlearn checkpoint (no 'model' entry)")
    return payload
