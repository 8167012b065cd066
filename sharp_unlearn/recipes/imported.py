"""Checkpoints made outside this tool: ``unlearn --checkpoint model.pt model.name=torchvision:resnet50 data...``.

A foreign checkpoint is a bare state dict (``torch.save(model.state_dict(), "model.pt")``, optionally
under ``state_dict`` / ``model``) without this tool's ``config``. The command line declares what it
is: the model (``model.*``), the data it was trained on (``data.*``, ``seed``) and the recipe the
retrained reference follows (``optimizer.*``, ``train.*``; with ``model.weights`` the reference
fine-tunes those starting weights on the retain set). :func:`import_checkpoint` writes it once as
a checkpoint of this tool under ``<output_dir>/imported/`` recording where it came from (path,
SHA-256), so the rest of unlearning treats it as any pretrained checkpoint.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from sharp_unlearn.data import build_dataset
from sharp_unlearn.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models import build_model
from sharp_unlearn.models.external import import_state_dict


def is_foreign(state: Any) -> bool:
    """A loaded checkpoint without this tool's config (a bare or wrapped state dict)."""
    return isinstance(state, dict) and "config" not in state


def _read(path: Path) -> Any:
    """The file's content, tensors and plain data only (``weights_only``: a foreign file runs no code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable input is the user's
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"checkpoint {str(path)!r} cannot be read as a state dict ({first[:200]}); expected "
                          "a checkpoint written by sharp-unlearn, or a state dict of tensors saved with torch.save"
                          ) from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_checkpoint(path: str | Path, cfg, bundle=None) -> Path | None:
    """``path`` as a checkpoint of this tool (its new path), or None when it already is one.

    ``cfg`` is the command line's config (model, data, seed, pretraining recipe); ``bundle`` the data
    set when the caller has it. A head of another size than the data's classes is an error: the model
    to unlearn keeps its head.
    """
    path = Path(path)
    raw = _read(path)
    if not is_foreign(raw):
        return None
    sha = file_sha256(path)
    bundle = bundle or build_dataset(cfg.data, cfg.seed)
    source = f"checkpoint {str(path)!r}"
    # the file replaces the starting weights, so model.weights is not read here
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape, load_weights=False)
    state = import_state_dict(model, raw, source)
    load_model_state(model, state, f"{source} (declared model.name={cfg.model.name!r})")
    tree = cfg.to_dict()
    tree.pop("forget", None)
    tree.pop("method", None)
    out = Path(cfg.output_dir).expanduser() / "imported" / f"{path.stem}-{sha[:12]}.pt"
    if out.is_file():  # the same file imported before with the same declaration: reuse
        existing = load_checkpoint(out)
        if existing.get("config") == tree:
            return out
    save_checkpoint(out, {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": tree, "config_hash": cfg.training_hash(), "kind": "pretrain", "completed": True,
        "num_classes": bundle.num_classes, "input_shape": list(bundle.input_shape),
        "imported_from": str(path.resolve()), "imported_sha256": sha,
    })
    return out


def checkpoint_origin(state: dict[str, Any]) -> dict[str, str]:
    """Tags saying where an imported checkpoint came from (empty for this tool's own)."""
    if "imported_from" not in state:
        return {}
    return {"imported_from": str(state["imported_from"]), "imported_sha256": str(state.get("imported_sha256", ""))}
