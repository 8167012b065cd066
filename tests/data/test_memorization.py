"""The held-out estimator's arithmetic, influence, agreement measures and score tables (no training)."""
from __future__ import annotations

import numpy as np
import pytest

from sharp_unlearn.data.memorization import (
    auroc,
    heldout_estimate,
    influence_top_k,
    read_metadata,
    read_scores,
    spearman,
    write_scores,
    write_table,
)
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.recipes.memorization_heldout import (
    HeldoutSettings,
    ModelOutcome,
    load_outcome,
    model_seed,
    save_outcome,
    subset_mask,
)


def test_estimate_matches_the_formula_by_hand():
    # 5 models, 3 examples
    masks = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1], [0, 0, 1]], dtype=bool)
    correct = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [0, 0, 0], [1, 0, 1]], dtype=bool)
    est = heldout_estimate(masks, correct)
    # example 0: in = models 0,1,2 (correct 1,1,0), out = 3,4 (correct 0,1); pooled q = 3/5
    q = 3 / 5
    assert est.n_in[0] == 3 and est.n_out[0] == 2
    assert est.p_in[0] == pytest.approx((2 + q) / 4)
    assert est.p_out[0] == pytest.approx((1 + q) / 3)
    assert est.score[0] == pytest.approx((2 + q) / 4 - (1 + q) / 3)
    r_in, r_out = 2.5 / 4, 1.5 / 3
    assert est.stderr[0] == pytest.approx(np.sqrt(r_in * (1 - r_in) / 4 + r_out * (1 - r_out) / 3))
    # example 1: correct exactly when in the subset -> clearly positive
    assert est.score[1] > 0.4


def test_unanimous_examples_score_exactly_zero_whatever_the_counts():
    rng = np.random.default_rng(0)
    masks = rng.random((7, 50)) < 0.8  # unbalanced in/out counts
    always = np.ones_like(masks)
    never = np.zeros_like(masks)
    assert np.all(heldout_estimate(masks, always).score == 0.0)
    assert np.all(heldout_estimate(masks, never).score == 0.0)


def test_no_held_out_model_means_no_evidence():
    masks = np.ones((6, 2), dtype=bool)
    masks[:, 1] = [1, 1, 1, 1, 0, 0]
    correct = masks.copy()  # right exactly when seen
    est = heldout_estimate(masks, correct)
    assert est.n_out[0] == 0 and est.score[0] == 0.0 and np.isfinite(est.stderr[0])
    assert est.score[1] > 0.5


def test_estimate_is_consistent_and_stderr_shrinks_like_one_over_sqrt_k():
    rng = np.random.default_rng(1)
    n = 400
    p_in, p_out = 0.9, 0.25
    results = {}
    for k in (20, 80, 320):
        masks = rng.random((k, n)) < 0.7
        correct = np.where(masks, rng.random((k, n)) < p_in, rng.random((k, n)) < p_out)
        est = heldout_estimate(masks, correct)
        results[k] = est
        # the mean over examples is close to the truth (shrinkage bias is O(1/K))
        assert abs(est.score.mean() - (p_in - p_out)) < 3 * est.stderr.mean() / np.sqrt(n) + 2.0 / k
    assert results[20].stderr.mean() > results[80].stderr.mean() > results[320].stderr.mean()
    ratio = results[20].stderr.mean() / results[320].stderr.mean()
    assert 3.0 < ratio < 5.5  # sqrt(16) = 4
    # the empirical spread of the estimates agrees with the reported standard error
    assert results[320].score.std() == pytest.approx(results[320].stderr.mean(), rel=0.25)


def test_estimate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="models, examples"):
        heldout_estimate(np.ones((3, 4), bool), np.ones((3, 5), bool))


def _dense_influence(masks, test_correct):
    k = masks.shape[0]
    out = np.zeros((masks.shape[1], test_correct.shape[1]))
    for i in range(masks.shape[1]):
        for j in range(test_correct.shape[1]):
            m, c = masks[:, i], test_correct[:, j]
            q = c.mean()
            n_in = m.sum()
            out[i, j] = (c[m].sum() + q) / (n_in + 1) - (c[~m].sum() + q) / (k - n_in + 1)
    return out


def test_influence_top_k_matches_the_dense_matrix_across_blocks():
    rng = np.random.default_rng(2)
    masks = rng.random((30, 25)) < 0.7
    test_correct = rng.random((30, 11)) < 0.6
    test_correct[:, 3] = masks[:, 7]  # test 3 is right exactly when train 7 was seen
    dense = _dense_influence(masks, test_correct)
    pairs = influence_top_k(masks, test_correct, top_k=4, max_block_bytes=8 * 3 * 25 * 3)  # blocks of 3 columns
    assert len(pairs["test_index"]) == 11 * 4
    for j in range(11):
        rows = pairs["test_index"] == j
        got = pairs["influence"][rows]
        assert list(pairs["rank"][rows]) == [0, 1, 2, 3]
        np.testing.assert_allclose(got, np.sort(dense[:, j])[::-1][:4])
        np.testing.assert_allclose(got, dense[pairs["train_index"][rows], j])
    top_of_3 = pairs["train_index"][(pairs["test_index"] == 3) & (pairs["rank"] == 0)]
    assert top_of_3.tolist() == [7]


def test_auroc_and_spearman():
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.3])
    assert auroc(scores, [1, 3]) == 1.0
    assert auroc(-scores, [1, 3]) == 0.0
    assert np.isnan(auroc(scores, []))
    assert spearman(scores, scores * 10 + 1) == pytest.approx(1.0)
    assert spearman(scores, -scores) == pytest.approx(-1.0)
    assert np.isnan(spearman(scores, np.ones(5)))


def test_score_table_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    masks, correct = rng.random((6, 20)) < 0.7, rng.random((6, 20)) < 0.8
    est = heldout_estimate(masks, correct)
    index = np.arange(100, 120)[::-1].copy()  # stable indices need not be positions
    path = write_scores(est, tmp_path / "s" / "scores.parquet", index=index,
                        extra={"proxy_loss": np.arange(20.0)}, metadata={"num_models": 6})
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    assert {"index", "score", "stderr", "n_in", "n_out", "p_in", "p_out", "proxy_loss"} <= set(table.column_names)
    got_index, got_score = read_scores(path, num_examples=120)
    assert got_index.tolist() == list(range(100, 120))  # sorted by index
    np.testing.assert_allclose(got_score, est.score[::-1])
    assert read_metadata(path) == {"num_models": 6}
    assert not list(path.parent.glob(".*tmp"))  # atomic write leaves no temp file


def test_score_table_is_accepted_by_forget_set_selection(tmp_path):
    import torch

    from sharp_unlearn.config import ForgetConfig
    from sharp_unlearn.data.base import DatasetBundle, IndexedTensorDataset
    from sharp_unlearn.data.forget import select_forget_set

    n = 30
    data = IndexedTensorDataset(torch.zeros(n, 2), torch.zeros(n, dtype=torch.long))
    bundle = DatasetBundle("toy", data, data, data, data, 2, (2,), np.zeros(n, dtype=np.int64))
    masks = np.ones((4, n), dtype=bool)
    masks[:2, :5] = False
    correct = masks.copy()
    correct[:, 5:] = True  # only examples 0..4 are memorized (right iff seen)
    path = write_scores(heldout_estimate(masks, correct), tmp_path / "scores.parquet")
    split = select_forget_set(ForgetConfig(kind="memorization", size=5, level="high", scores=str(path)), bundle, 0)
    assert sorted(split.forget_indices.tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("columns, message", [
    ({"index": np.arange(3)}, "lacks column"),
    ({"index": np.array([0, 0, 1]), "score": np.zeros(3)}, "repeats"),
    ({"index": np.arange(3), "score": np.array([0.0, np.nan, 1.0])}, "non-finite"),
    ({"index": np.arange(3) + 5, "score": np.zeros(3)}, "outside"),
])
def test_bad_score_tables_are_config_errors(tmp_path, columns, message):
    path = write_table(columns, tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match=message):
        read_scores(path, num_examples=3)


def test_missing_or_foreign_score_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_scores(tmp_path / "nope.parquet")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match="not a readable Parquet"):
        read_scores(tmp_path / "x.parquet")


# ---------------------------------------------------------------- subsets, model files, settings
def test_subsets_are_fixed_by_seed_and_model_id_alone():
    a = subset_mask(1000, 0.7, seed=3, model_id=5)
    assert a.sum() == 700
    np.testing.assert_array_equal(a, subset_mask(1000, 0.7, seed=3, model_id=5))
    assert (a != subset_mask(1000, 0.7, seed=3, model_id=6)).any()
    assert (a != subset_mask(1000, 0.7, seed=4, model_id=5)).any()
    # over many models every example is held out about 30 % of the time
    share_in = np.mean([subset_mask(200, 0.7, 0, k) for k in range(300)], axis=0)
    assert abs(share_in.mean() - 0.7) < 1e-9 and share_in.min() > 0.55 and share_in.max() < 0.85
    assert model_seed(0, 1) != model_seed(0, 2) != model_seed(1, 1)


def test_model_file_round_trip_and_rejection(tmp_path):
    rng = np.random.default_rng(4)
    outcome = ModelOutcome(3, rng.random(37) < 0.5, rng.random(37) < 0.5, rng.random(11) < 0.5, 1.5, "abc")
    path = save_outcome(tmp_path / "models" / "model-00003.npz", outcome)
    back = load_outcome(path, "abc")
    assert back is not None and back.model_id == 3 and back.wall_seconds == 1.5
    for name in ("mask", "train_correct", "test_correct"):
        np.testing.assert_array_equal(getattr(back, name), getattr(outcome, name))
    assert load_outcome(path, "another-recipe") is None
    assert load_outcome(tmp_path / "missing.npz", "abc") is None
    path.write_bytes(path.read_bytes()[:40])  # truncated
    assert load_outcome(path, "abc") is None


@pytest.mark.parametrize("kwargs, message", [
    ({"num_models": 1}, "models=1"),
    ({"subset_fraction": 1.0}, "subset_fraction=1.0"),
    ({"workers": 0}, "workers=0"),
    ({"cpus_per_model": 0}, "cpus_per_model=0"),
    ({"executor": "dask"}, "executor='dask'.*ray, serial"),
    ({"influence_top_k": 0}, "influence_top_k=0"),
])
def test_settings_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        HeldoutSettings(**kwargs)
