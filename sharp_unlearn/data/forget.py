"""Forget-set selection: random, by class, or by memorization level.

Examples are named by their stable ``index`` (what score files and Parquet
shards use); subsets of the training split need *positions*, so a
:class:`ForgetSplit` carries both. The split hash names the selection: a
retrain reference is reused only for the same hash.

Memorization levels over a score per training example: ``high`` = top N,
``low`` = bottom N, ``mid`` = the N closest to 0.5 when scores lie in [-1, 1]
(memorization estimates; else to the median), ``mix`` = N/3 of each (disjoint). Ties are broken by a
seeded random order, so selection is deterministic under the seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sharp_unlearn.config import ForgetConfig, stable_hash
from sharp_unlearn.data.base import DatasetBundle
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.files import atomic_path

PROXIES = ("proxy:loss", "proxy:confidence", "proxy:learning_speed", "flipped")


@dataclass
class ForgetSplit:
    #: positions in the training split (for Subset)
    forget_positions: np.ndarray
    retain_positions: np.ndarray
    #: stable example indices (for score files, Parquet, MLflow artifacts)
    forget_indices: np.ndarray
    retain_indices: np.ndarray
    split_hash: str
    label: str
    #: per-position memorization scores when selection used them (else None)
    scores: np.ndarray | None = None

    def to_parquet(self, path: str | os.PathLike) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = {"index": pa.array(self.forget_indices, pa.int64()),
                   "position": pa.array(self.forget_positions, pa.int64())}
        if self.scores is not None:
            columns["score"] = pa.array(self.scores[self.forget_positions], pa.float64())
        table = pa.table(columns).replace_schema_metadata(
            {"split_hash": self.split_hash, "label": self.label})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path


def train_stable_indices(bundle: DatasetBundle) -> np.ndarray:
    """The stable index of every training example, by position."""
    if "train_index" in bundle.meta:
        return np.asarray(bundle.meta["train_index"], dtype=np.int64)
    index = getattr(bundle.train_eval, "index", None)
    if index is not None:
        return np.asarray(index, dtype=np.int64)
    return np.arange(len(bundle.train_targets), dtype=np.int64)


def _seeded_order(values: np.ndarray, seed: int, descending: bool) -> np.ndarray:
    """Positions sorted by value, ties broken by a seeded random key."""
    tiebreak = np.random.default_rng(seed + 1013).random(len(values))
    key = -values if descending else values
    return np.lexsort((tiebreak, key))


def level_positions(scores: np.ndarray, level: str, size: int, seed: int) -> np.ndarray:
    """Positions of ``size`` examples at a memorization level (see module doc)."""
    n = len(scores)
    if size > n:
        raise ConfigError(f"forget.size={size} is larger than the training set ({n} examples)")
    if level == "high":
        return _seeded_order(scores, seed, descending=True)[:size]
    if level == "low":
        return _seeded_order(scores, seed, descending=False)[:size]
    if level == "mid":
        return _seeded_order(np.abs(scores - _mid_target(scores)), seed, descending=False)[:size]
    if level == "mix":
        third = size // 3
        counts = {"high": size - 2 * third, "low": third, "mid": third}
        chosen: list[int] = []
        taken = np.zeros(n, dtype=bool)
        for lvl in ("high", "low", "mid"):
            order = {"high": _seeded_order(scores, seed, True),
                     "low": _seeded_order(scores, seed, False),
                     "mid": _seeded_order(np.abs(scores - _mid_target(scores)), seed, False)}[lvl]
            picked = [int(p) for p in order if not taken[p]][:counts[lvl]]
            taken[picked] = True
            chosen.extend(picked)
        return np.asarray(chosen, dtype=np.int64)
    raise ConfigError(f"forget.level={level!r} is not valid; expected one of: high, mid, low, mix")


def _mid_target(scores: np.ndarray) -> float:
    """0.5 on a memorization scale (differences of probabilities lie in [-1, 1]); the median
    for anything else (e.g. unbounded loss proxies)."""
    if len(scores) and scores.min() >= -1.0 and scores.max() <= 1.0:
        return 0.5
    return float(np.median(scores))


def rank_tertiles(scores: np.ndarray) -> dict[str, np.ndarray]:
    """Positions (into ``scores``) of the low / mid / high rank tertiles.

    Rank tertiles, not score thresholds: score scales differ (Feldman's
    estimates, unbounded loss proxies, the 0/1 flip record) and ties must not
    leave a group empty. Sizes differ by at most one; ties keep their order.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ConfigError(f"memorization scores must be one number per example, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ConfigError("memorization scores contain NaN or infinite values")
    order = np.argsort(scores, kind="stable")
    low, mid, high = np.array_split(order, 3)
    return {"low": np.sort(low), "mid": np.sort(mid), "high": np.sort(high)}


def memorization_groups(scores: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Split training ``positions`` into low / mid / high by rank tertiles of their scores
    (the same groups RUM unlearns in sequence)."""
    positions = np.asarray(positions)
    return {level: positions[idx] for level, idx in rank_tertiles(scores[positions]).items()}


# ------------------------------------------------------------------ scores
def load_score_file(path: str, stable: np.ndarray) -> np.ndarray:
    """Scores aligned with training positions, from a Feldman ``.npz`` or a Parquet table."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"forget.scores={path!r}: no such file; expected a .npz with 'tr_mem', "
                          f"a Parquet table with 'index' and 'score', or one of: {', '.join(PROXIES)}")
    if file.suffix == ".npz":
        with np.load(file) as data:
            if "tr_mem" not in data:
                raise ConfigError(f"score file {path!r} has no 'tr_mem' array (keys: {sorted(data.files)})")
            table = np.asarray(data["tr_mem"], dtype=np.float64)
        if stable.max(initial=-1) >= len(table):
            raise ConfigError(f"score file {path!r} has {len(table)} scores but the training set uses "
                              f"index {int(stable.max())}; expected scores aligned by training index")
        return table[stable]
    if file.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        tbl = pq.read_table(file)
        if not {"index", "score"} <= set(tbl.column_names):
            raise ConfigError(f"score table {path!r} needs columns 'index' and 'score' "
                              f"(found: {tbl.column_names})")
        index = tbl.column("index").to_numpy().astype(np.int64)
        score = tbl.column("score").to_numpy().astype(np.float64)
        lookup = dict(zip(index.tolist(), score.tolist(), strict=True))
        missing = [int(i) for i in stable if int(i) not in lookup]
        if missing:
            raise ConfigError(f"score table {path!r} lacks {len(missing)} training examples "
                              f"(e.g. index {missing[0]})")
        return np.asarray([lookup[int(i)] for i in stable], dtype=np.float64)
    raise ConfigError(f"score file {path!r}: unknown format {file.suffix!r}; expected .npz or .parquet")


def stored_scores(spec: str, bundle: DatasetBundle) -> np.ndarray:
    """Scores the data layer can read itself: the recorded label flips (``flipped``) or a score file.

    Proxies computed from a model or a training run are computed above this
    layer and passed in (:func:`sharp_unlearn.recipes.memorization.select_forget_set`).
    """
    stable = train_stable_indices(bundle)
    if spec == "flipped":
        flipped = bundle.meta.get("flipped")
        if flipped is None:
            raise ConfigError(f"forget.scores='flipped' needs a data set with recorded label flips "
                              f"(data.label_noise > 0); {bundle.name} has none")
        scores = np.zeros(len(stable))
        scores[np.isin(np.arange(len(stable)), np.asarray(flipped))] = 1.0
        return scores
    if spec in PROXIES:
        raise ConfigError(f"forget.scores={spec!r} is computed from a model or a training run; select the "
                          "forget set with sharp_unlearn.recipes.memorization.select_forget_set")
    return load_score_file(spec, stable)


# ------------------------------------------------------------------ select
def select_forget_set(cfg: ForgetConfig, bundle: DatasetBundle, seed: int,
                      scores: np.ndarray | None = None) -> ForgetSplit:
    """Choose the forget set; deterministic under ``seed``.

    ``scores`` (aligned with training positions) overrides ``cfg.scores``; without them a
    memorization forget set reads :func:`stored_scores` (proxies are computed, and passed in,
    by :func:`sharp_unlearn.recipes.memorization.select_forget_set`).
    """
    targets = np.asarray(bundle.train_targets)
    n = len(targets)
    stable = train_stable_indices(bundle)
    size = cfg.size if cfg.size is not None else (
        int(round(cfg.fraction * n)) if cfg.fraction is not None else None)
    if size is not None and size > n:
        raise ConfigError(f"forget.size={size} is larger than the training set ({n} examples)")
    used_scores = None
    if cfg.kind == "random":
        positions = np.sort(np.random.default_rng(seed + 4099).choice(n, size=size, replace=False))
    elif cfg.kind == "class":
        known = set(range(bundle.num_classes))
        bad = [c for c in cfg.classes if c not in known]
        if bad:
            raise ConfigError(f"forget.classes contains {bad[0]}, not a class of {bundle.name}; "
                              f"expected ids in 0..{bundle.num_classes - 1}")
        positions = np.flatnonzero(np.isin(targets, cfg.classes))
        if size is not None and size < len(positions):  # a sub-sample of the classes
            positions = np.sort(np.random.default_rng(seed + 4099).choice(positions, size=size, replace=False))
    else:
        used_scores = scores if scores is not None else stored_scores(cfg.scores, bundle)
        used_scores = np.asarray(used_scores, dtype=np.float64)
        if len(used_scores) != n:
            raise ConfigError(f"memorization scores have {len(used_scores)} entries; expected {n} "
                              "(one per training example)")
        positions = np.sort(level_positions(used_scores, cfg.level, size, seed))
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) == 0:
        raise ConfigError(f"forget set {cfg.label!r} is empty; expected at least one example")
    if len(positions) >= n:
        raise ConfigError(f"forget set {cfg.label!r} is the whole training set ({n} examples); "
                          "nothing would be left to retain")
    keep = np.ones(n, dtype=bool)
    keep[positions] = False
    retain = np.flatnonzero(keep).astype(np.int64)
    split_hash = stable_hash({"dataset": bundle.name, "n": n, "forget": stable[positions].tolist(),
                              "label_noise_flipped": np.asarray(bundle.meta.get("flipped", [])).tolist()})
    return ForgetSplit(positions, retain, stable[positions], stable[retain], split_hash, cfg.label,
                       used_scores)
