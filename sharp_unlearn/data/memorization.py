"""Memorization scores: the held-out estimator's arithmetic, agreement measures, score tables.

Feldman & Zhang (2020) define the memorization of training example ``i`` by an
algorithm A as

    mem(i) = P[h(x_i) = y_i | h = A(S), i in S] - P[h(x_i) = y_i | h = A(S), i not in S]

and estimate it by training K models on random subsets S_1..S_K (each a
fraction p of the training set) and comparing how often each example is
classified correctly by the models that saw it and by the models that did
not. The influence of training example i on test example j is the same
difference measured on test example j.

This module holds the parts that are pure arithmetic and IO (fast, testable
without training); estimation, which trains models, is a recipe: the K
trainings and their Ray orchestration live in
:mod:`sharp_unlearn.recipes.memorization_heldout`, the single-run proxies
(loss, confidence, learning speed) in :mod:`sharp_unlearn.recipes.memorization_proxies`,
and the ``memorization`` command's entry points in :mod:`sharp_unlearn.recipes.memorization`.

Small-K shrinkage: each conditional probability gets one pseudo-observation
at the example's pooled accuracy ``q = correct / K`` over all K models:
``p_in = (correct_in + q) / (n_in + 1)``, likewise ``p_out``. With p = 0.7
and a few dozen models some examples are never held out, where a plain mean
is undefined; the shrunk estimate is then 0 (no evidence of memorization)
rather than an artefact. Shrinking towards the pooled rate (not towards 1/2)
keeps examples that every model gets right, or every model gets wrong, at
exactly 0 whatever the in/out counts; it moves a score by at most
``1 / (count + 1)`` (0.0007 for the ~1400 in-subset models of Feldman &
Zhang's K = 2000). ``n_in`` / ``n_out`` are stored next to each score so users
can filter on evidence. The standard error uses Jeffreys-smoothed rates
``(correct + 1/2) / (count + 1)`` so that it is never 0 for an example every
model agrees on (with 4 models that agreement is weak evidence).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.files import atomic_path

#: columns every score table has (forget-set selection reads ``index`` and ``score``)
SCORE_COLUMNS = ("index", "score", "stderr", "n_in", "n_out")
INFLUENCE_COLUMNS = ("test_index", "train_index", "influence", "rank")


@dataclass
class HeldoutEstimate:
    """Per-example estimate over the K models (arrays aligned with the training index)."""

    score: np.ndarray
    stderr: np.ndarray
    n_in: np.ndarray
    n_out: np.ndarray
    p_in: np.ndarray
    p_out: np.ndarray

    @property
    def num_examples(self) -> int:
        return len(self.score)


def _jeffreys(correct: np.ndarray, count: np.ndarray | int) -> np.ndarray:
    """A rate kept off 0 and 1 (for standard errors)."""
    return (correct + 0.5) / (count + 1.0)


def _shrunk(correct: np.ndarray, count: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """One pseudo-observation at ``prior``: defined for ``count == 0`` (= prior)."""
    return (correct + prior) / (count + 1.0)


def heldout_estimate(masks: np.ndarray, correct: np.ndarray) -> HeldoutEstimate:
    """Memorization of each column from ``masks[k, i]`` (i in model k's subset) and
    ``correct[k, i]`` (model k classifies example i correctly), both ``[K, n]``.

    The standard error is that of a difference of two independent Bernoulli
    means, ``sqrt(r_in (1 - r_in) / (n_in + 1) + r_out (1 - r_out) / (n_out + 1))``
    with Jeffreys rates ``r``; it shrinks like ``1 / sqrt(K)``.
    """
    masks = np.asarray(masks, dtype=bool)
    correct = np.asarray(correct, dtype=bool)
    if masks.ndim != 2 or masks.shape != correct.shape:
        raise ValueError(f"masks {masks.shape} and correct {correct.shape} must both be [models, examples]")
    n_in = masks.sum(axis=0).astype(np.int64)
    n_out = masks.shape[0] - n_in
    c_in = (masks & correct).sum(axis=0)
    c_out = (~masks & correct).sum(axis=0)
    prior = (c_in + c_out) / masks.shape[0]
    p_in = _shrunk(c_in, n_in, prior)
    p_out = _shrunk(c_out, n_out, prior)
    r_in, r_out = _jeffreys(c_in, n_in), _jeffreys(c_out, n_out)
    stderr = np.sqrt(r_in * (1 - r_in) / (n_in + 1.0) + r_out * (1 - r_out) / (n_out + 1.0))
    return HeldoutEstimate(score=p_in - p_out, stderr=stderr, n_in=n_in, n_out=n_out, p_in=p_in, p_out=p_out)


def influence_top_k(masks: np.ndarray, test_correct: np.ndarray, top_k: int = 10,
                    max_block_bytes: int = 256 * 2**20) -> dict[str, np.ndarray]:
    """The ``top_k`` training examples with the largest influence on each test example.

    ``infl[i, j] = P(correct on test j | i in) - P(correct on test j | i out)``
    (shrunk towards test j's pooled accuracy as in :func:`heldout_estimate`). The full ``[n_train, n_test]``
    matrix is never held at once (CIFAR-100: 50k x 10k floats = 2 GB): it is
    computed in blocks of test columns sized to ``max_block_bytes``, and only
    the top ``k`` rows per column are kept. Returns long-format columns
    (``test_index``, ``train_index``, ``influence``, ``rank`` 0 = strongest).
    """
    masks = np.asarray(masks, dtype=bool)
    test_correct = np.asarray(test_correct, dtype=bool)
    if masks.ndim != 2 or test_correct.ndim != 2 or masks.shape[0] != test_correct.shape[0]:
        raise ValueError(f"masks {masks.shape} and test_correct {test_correct.shape} must share the models axis")
    num_models, n_train = masks.shape
    n_test = test_correct.shape[1]
    k = int(min(max(top_k, 1), n_train))
    m_in = masks.astype(np.float32)
    n_in = m_in.sum(axis=0).astype(np.float64)[:, None]
    n_out = num_models - n_in
    block = max(1, int(max_block_bytes // (8 * 3 * max(n_train, 1))))
    test_idx, train_idx, values, ranks = [], [], [], []
    for start in range(0, n_test, block):
        c = test_correct[:, start:start + block].astype(np.float32)
        # counts are exact in float32 (integers < 2**24); the ratios are taken in float64
        c_in = (m_in.T @ c).astype(np.float64)  # [n_train, b]: correct-and-in counts
        c_out = c.sum(axis=0)[None, :] - c_in   # correct-and-out = correct - correct-and-in
        prior = c.mean(axis=0)[None, :]
        infl = _shrunk(c_in, n_in, prior) - _shrunk(c_out, n_out, prior)
        top = np.argpartition(-infl, k - 1, axis=0)[:k] if k < n_train else np.tile(
            np.arange(n_train)[:, None], (1, infl.shape[1]))
        top_vals = np.take_along_axis(infl, top, axis=0)
        order = np.argsort(-top_vals, axis=0, kind="stable")
        top = np.take_along_axis(top, order, axis=0)
        top_vals = np.take_along_axis(top_vals, order, axis=0)
        cols = np.arange(start, start + infl.shape[1])
        test_idx.append(np.repeat(cols, k))
        train_idx.append(top.T.reshape(-1))
        values.append(top_vals.T.reshape(-1))
        ranks.append(np.tile(np.arange(k), len(cols)))
    if not test_idx:
        empty = np.zeros(0, dtype=np.int64)
        return {"test_index": empty, "train_index": empty, "influence": np.zeros(0), "rank": empty}
    return {"test_index": np.concatenate(test_idx).astype(np.int64),
            "train_index": np.concatenate(train_idx).astype(np.int64),
            "influence": np.concatenate(values).astype(np.float64),
            "rank": np.concatenate(ranks).astype(np.int64)}


# ---------------------------------------------------------------- agreement
def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` separating the ``positives`` indices
    (e.g. the flipped labels) from the rest; NaN when one side is empty."""
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.zeros(len(scores), dtype=bool)
    labels[np.asarray(positives, dtype=np.int64)] = True
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties get average ranks); NaN if either side is constant."""
    from scipy.stats import spearmanr

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def proxy_agreement(scores: np.ndarray, proxies: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Spearman correlation of each proxy with the held-out scores."""
    return {kind: spearman(scores, values) for kind, values in proxies.items()}


# ---------------------------------------------------------------- tables
def write_table(columns: Mapping[str, np.ndarray], path: str | os.PathLike,
                metadata: Mapping[str, Any] | None = None) -> Path:
    """Write columns as Parquet atomically (temp file, then rename); ``metadata``
    goes into the schema's key-value metadata as JSON under ``sharp_unlearn``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({name: np.asarray(values) for name, values in columns.items()})
    if metadata:
        table = table.replace_schema_metadata({"sharp_unlearn": json.dumps(dict(metadata), default=str)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_scores(estimate: HeldoutEstimate, path: str | os.PathLike, *, index: np.ndarray | None = None,
                 extra: Mapping[str, np.ndarray] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """The score table: ``index``, ``score``, ``stderr``, ``n_in``, ``n_out``, ``p_in``,
    ``p_out`` and any ``extra`` columns (e.g. ``proxy_loss``), one row per training example."""
    n = estimate.num_examples
    columns: dict[str, np.ndarray] = {
        "index": np.arange(n, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64),
        "score": estimate.score.astype(np.float64),
        "stderr": estimate.stderr.astype(np.float64),
        "n_in": estimate.n_in.astype(np.int64),
        "n_out": estimate.n_out.astype(np.int64),
        "p_in": estimate.p_in.astype(np.float64),
        "p_out": estimate.p_out.astype(np.float64),
    }
    for name, values in (extra or {}).items():
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} rows, expected {n}")
        columns[name] = np.asarray(values)
    return write_table(columns, path, metadata)


def read_scores(path: str | os.PathLike, num_examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(index, score)`` from a score table, sorted by index.

    Raises ConfigError naming the file when it is missing, lacks the ``index`` /
    ``score`` columns, holds duplicate or out-of-range indices, or non-finite scores.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"memorization score table {str(path)!r} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise ConfigError(f"memorization score table {str(path)!r} is not a readable Parquet file: {exc}") from None
    missing = [c for c in ("index", "score") if c not in table.column_names]
    if missing:
        raise ConfigError(f"memorization score table {str(path)!r} lacks column(s) {missing}; "
                          f"expected at least 'index' and 'score', found {table.column_names}")
    index = np.asarray(table.column("index").to_numpy(), dtype=np.int64)
    score = np.asarray(table.column("score").to_numpy(), dtype=np.float64)
    if len(np.unique(index)) != len(index):
        raise ConfigError(f"memorization score table {str(path)!r} repeats some indices")
    if num_examples is not None and len(index) and (index.min() < 0 or index.max() >= num_examples):
        raise ConfigError(f"memorization score table {str(path)!r} has indices outside [0, {num_examples}); "
                          "was it computed for another data set?")
    if not np.isfinite(score).all():
        raise ConfigError(f"memorization score table {str(path)!r} holds non-finite scores")
    order = np.argsort(index, kind="stable")
    return index[order], score[order]


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``sharp_unlearn`` metadata written with a table (empty if none)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"sharp_unlearn")
    return json.loads(raw) if raw else {}
