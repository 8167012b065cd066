"""Held-out memorization scores for one seed of a grid spec: what ranks the forget sets by level.

``reproduce table`` and ``reproduce ablation`` both pick their low / mid / high forget sets from
these scores (the spec's ``memorization`` section; cached per training hash).
"""
from __future__ import annotations

from typing import Any

from sharp_unlearn.config import merge
from sharp_unlearn.recipes.memorization import compute_memorization
from sharp_unlearn.recipes.memorization_heldout import HeldoutSettings
from sharp_unlearn.validation import config_from_dict


def memorization_scores(spec: dict[str, Any], seed: int, output_dir: str, tracking: dict, quiet: bool) -> str:
    """Held-out memorization scores for this seed's training set (cached per training hash)."""
    mem = dict(spec.get("memorization") or {})
    tree = merge(spec["base"], {"seed": seed, "output_dir": output_dir, "tracking": tracking})
    tree = merge(tree, mem.pop("config", {}) or {})
    cfg = config_from_dict(tree)
    settings = HeldoutSettings(**mem)
    result = compute_memorization(cfg, settings, quiet=quiet)
    return str(result.scores_path)
