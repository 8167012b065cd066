"""Saliency masks: which parameter entries an unlearning method may move.

SalUn (Fan et al. 2024) and Sharp MinMax restrict forgetting to the entries
where the forget loss is most sensitive::

    s = | grad_w L_F(w; D_F) |          at the original weights, over the whole forget set
    M = 1[s is among the largest `fraction` of all entries, all parameters together]

``order="smallest"`` keeps the smallest `fraction` instead: what the Sharp
MinMax paper's released mask generator does (it ranks ascending although its
comment says "top"), kept as a switch so the two can be compared.

This module is pure functions of the scores (the absolute forget-loss
gradients): ranking, selection, complements, validation and mask files. The
pass that runs a model over the forget set to get those gradients is
:func:`sharp_unlearn.engine.saliency.forget_gradient_saliency`.

Masks are ``{parameter name: 0/1 float tensor}`` (the shape the engine's
``Objective.mask`` takes). On disk they are stored as booleans with their
metadata, written atomically and read with ``weights_only=True``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharp_unlearn.errors import ConfigError, shape_mismatch
from sharp_unlearn.files import atomic_path

Mask = dict[str, torch.Tensor]
MASK_FORMAT = "sharp-unlearn-mask"
MASK_FORMAT_VERSION = 1
#: the checkpoint layout version every file of this tool carries (the same key as engine checkpoints)
FILE_FORMAT_VERSION = 1
#: which end of the saliency ranking a mask keeps
MASK_ORDERS = ("largest", "smallest")


def _check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ConfigError(f"mask fraction {fraction!r} is out of range; expected a value in (0, 1)")
    return float(fraction)


# ------------------------------------------------------------------ selection
def _flatten(scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if not scores:
        raise ValueError("saliency scores are empty; expected {parameter name: tensor}")
    tensors = [s.detach() for s in scores.values()]
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    device = tensors[0].device
    flat = torch.cat([t.reshape(-1).to(device, dtype) for t in tensors])
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("saliency scores contain NaN or infinite entries; cannot rank them")
    return flat


def _top_k_flat(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean vector marking the ``k`` largest entries; among equal values the
    earlier positions win (deterministic, O(n) memory: no full sort)."""
    n = flat.numel()
    selected = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k <= 0:
        return selected
    if k >= n:
        selected.fill_(True)
        return selected
    # the k-th largest value is the (n - k + 1)-th smallest
    threshold = torch.kthvalue(flat.cpu() if flat.device.type == "mps" else flat, n - k + 1).values
    threshold = threshold.to(flat.device)
    above = flat > threshold
    selected |= above
    still_needed = k - int(above.sum())
    ties = flat == threshold
    # the first `still_needed` tied entries in flat order
    selected |= ties & (torch.cumsum(ties.to(torch.int64), 0) <= still_needed)
    return selected


def _check_order(order: str) -> str:
    if order not in MASK_ORDERS:
        raise ConfigError(f"mask order {order!r} is not valid; expected one of: {', '.join(MASK_ORDERS)}")
    return order


def _select(flat: torch.Tensor, k: int, order: str) -> torch.Tensor:
    """The ``k`` largest (or smallest) entries; ties go to the earlier positions either way."""
    return _top_k_flat(flat if order == "largest" else -flat, k)


def _count(fraction: float, n: int) -> int:
    """Entries in a mask of ``fraction``: rounded, at least one, at most n."""
    return max(1, min(n, int(math.floor(fraction * n + 0.5))))


def _unflatten(selected: torch.Tensor, scores: Mapping[str, torch.Tensor]) -> Mask:
    mask: Mask = {}
    offset = 0
    for name, s in scores.items():
        size = s.numel()
        mask[name] = selected[offset:offset + size].reshape(s.shape).to(torch.float32)
        offset += size
    return mask


def saliency_mask(scores: Mapping[str, torch.Tensor], fraction: float, order: str = "largest") -> Mask:
    """0/1 mask marking the LARGEST (``order="smallest"``: smallest) ``fraction`` of entries over all
    parameters together.

    ``round(fraction * n)`` entries (at least one) are selected; ties at the
    threshold go to the entries that come first (parameter order of
    ``scores``, then element order), so the mask is deterministic.
    """
    fraction = _check_fraction(fraction)
    order = _check_order(order)
    flat = _flatten(scores)
    return _unflatten(_select(flat, _count(fraction, flat.numel()), order), scores)


def masks_for_fractions(scores: Mapping[str, torch.Tensor], fractions: Iterable[float],
                        order: str = "largest") -> dict[float, Mask]:
    """One mask per fraction from the same scores (nested: a smaller fraction's mask
    is contained in a larger one's)."""
    fractions = [_check_fraction(f) for f in fractions]
    order = _check_order(order)
    if not fractions:
        raise ConfigError("no mask fractions given; expected e.g. 0.1,0.3,0.5")
    flat = _flatten(scores)
    n = flat.numel()
    return {f: _unflatten(_select(flat, _count(f, n), order), scores) for f in fractions}


def complement(mask: Mapping[str, torch.Tensor]) -> Mask:
    """``1 - M``: the entries a mask does NOT mark."""
    return {name: 1.0 - m.to(torch.float32) for name, m in mask.items()}


def mask_fraction(mask: Mapping[str, torch.Tensor]) -> float:
    """Share of entries a mask marks."""
    total = sum(m.numel() for m in mask.values())
    on = sum(float(m.sum()) for m in mask.values())
    return on / total if total else 0.0


def check_mask(mask: Mapping[str, torch.Tensor], model: nn.Module, source: str = "mask") -> Mask:
    """Validate a mask against a model's trainable parameters; returns it as 0/1 float tensors.

    Parameters the mask does not name would silently be left unrestricted, and
    a shape mismatch means the mask belongs to another architecture: both are
    input errors.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    detail = shape_mismatch({n: tuple(p.shape) for n, p in params.items()},
                            {n: tuple(m.shape) for n, m in mask.items()})
    if detail:
        raise ConfigError(f"{source} does not match the model's parameters ({detail})")
    out: Mask = {}
    for name, p in params.items():
        m = mask[name].to(p.device, torch.float32)
        if not bool(((m == 0) | (m == 1)).all()):
            raise ConfigError(f"{source}: entries of {name!r} are not 0/1")
        out[name] = m
    return out


# ------------------------------------------------------------------ files
def _plain(value: Any) -> Any:
    """Metadata as plain Python values (what ``weights_only=True`` loading accepts)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def save_mask(path: str | os.PathLike, mask: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Path:
    """Write a mask (booleans) and its metadata atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FILE_FORMAT_VERSION,
        "format": MASK_FORMAT,
        "mask": {name: m.detach().to("cpu") != 0 for name, m in mask.items()},
        "meta": _plain(dict(meta or {})),
    }
    # an interrupted write leaves the old mask file (or none), never half of one
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(payload, handle)
    return path


def load_mask(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Mask, dict[str, Any]]:
    """Read a mask file written by :func:`save_mask`: ``(mask as 0/1 floats, meta)``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"mask file {str(path)!r} does not exist; create one with `sharp-unlearn mask`")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ConfigError(f"mask file {str(path)!r} cannot be read ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != MASK_FORMAT or "mask" not in payload:
        raise ConfigError(f"{str(path)!r} is not a sharp-unlearn mask file")
    mask = {name: m.to(torch.float32) for name, m in payload["mask"].items()}
    return mask, dict(payload.get("meta", {}))


def mask_file_name(label: str, fraction: float, order: str = "largest") -> str:
    # the default order keeps its historical name; the other one must not overwrite it
    suffix = "" if order == "largest" else f"-{order}"
    return f"mask-{label}-f{fraction:g}{suffix}.pt"


__all__: Sequence[str] = (
    "Mask", "saliency_mask", "masks_for_fractions", "complement", "mask_fraction",
    "check_mask", "save_mask", "load_mask", "mask_file_name",
)
