"""Entanglement on the paper code's scale: bounded variance, size-weighted class-wise scores.

Expected values are worked out by hand on points of the unit circle (written next to each
number), not by calling the code under test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from sharp_unlearn.metrics.entanglement import PAPER_SCALE_SCORES, entanglement


def _pair(cos: float, sin: float, copies: int = 1) -> list[list[float]]:
    """``(cos, +sin)`` and ``(cos, -sin)``, ``copies`` times each: unit vectors, mean ``(cos, 0)``."""
    return [[cos, sin], [cos, -sin]] * copies


def _sets(*classes):
    """``classes``: (label, retain points, forget points) -> the four arrays ``entanglement`` takes."""
    retain = [p for _, r, _ in classes for p in r]
    forget = [p for _, _, f in classes for p in f]
    r_labels = [c for c, r, _ in classes for _ in r]
    f_labels = [c for c, _, f in classes for _ in f]
    return np.array(retain), np.array(r_labels), np.array(forget), np.array(f_labels)


SQRT3_2 = math.sqrt(3) / 2
# class 0: retain (0, +-1), forget (1/2, +-sqrt3/2); n = 2 + 2
#   intra = 1 + 3/4 = 7/4; mu_R = (0,0), mu_F = (1/2,0), mu = (1/4,0): inter = (1/16 + 1/16)/2 = 1/16 -> ratio 28
#   EMD: each retain point to the forget point on its side, cost 2 sin 15 deg over the max cost 2 sin 75 deg
CLASS_0 = (0, _pair(0.0, 1.0), _pair(0.5, SQRT3_2))
VAR_0, W_0, SIZE_0 = 28.0, 1.0 - math.tan(math.radians(15)), 4
# class 1: retain (0, +-1) twice, forget (sqrt3/2, +-1/2); n = 4 + 2
#   intra = 1 + 1/4; mu = (sqrt3/6, 0): inter = (3/36 + 12/36)/2 = 5/24 -> ratio 1.25 * 24/5 = 6
#   EMD: mass 1/4 per retain point to the forget point on its side, cost 1 over the max cost sqrt3
CLASS_1 = (1, _pair(0.0, 1.0, copies=2), _pair(SQRT3_2, 0.5))
VAR_1, W_1, SIZE_1 = 6.0, 1.0 - 1.0 / math.sqrt(3), 6
# class 2: retain (0, +-1), a single forget example (1, 0); n = 2 + 1
#   intra = 1 + 0; mu = (1/3, 0): inter = (1/9 + 4/9)/2 = 5/18 -> ratio 18/5
CLASS_2 = (2, _pair(0.0, 1.0), [[1.0, 0.0]])
VAR_2, SIZE_2 = 3.6, 3


def test_size_weighted_classwise_scores_match_the_hand_computation():
    scores = entanglement(*_sets(CLASS_0, CLASS_1, CLASS_2))
    # the raw class-wise scores: unweighted, classes with >= 2 examples per set (class 2 left out)
    assert scores["variance_classwise"] == pytest.approx((VAR_0 + VAR_1) / 2)
    assert scores["wasserstein_classwise"] == pytest.approx((W_0 + W_1) / 2)
    # size-weighted variance keeps the class with a single forget example, weight n_retain + n_forget
    weighted_variance = (VAR_0 * SIZE_0 + VAR_1 * SIZE_1 + VAR_2 * SIZE_2) / (SIZE_0 + SIZE_1 + SIZE_2)
    assert weighted_variance == pytest.approx(158.8 / 13)
    assert scores["variance_classwise_weighted"] == pytest.approx(weighted_variance)
    assert scores["variance_classwise_weighted_bounded"] == pytest.approx(weighted_variance / 1300)
    # size-weighted Wasserstein needs two examples per set: class 2 is not in it
    assert scores["wasserstein_classwise_weighted"] == pytest.approx((W_0 * SIZE_0 + W_1 * SIZE_1) / 10)
    assert scores["weighted_classes"] == {"variance": [0, 1, 2], "wasserstein": [0, 1]}


def test_weights_follow_class_sizes():
    """Doubling class 1 (same geometry) moves the weighted means toward class 1; the unweighted ones stay."""
    bigger_1 = (1, _pair(0.0, 1.0, copies=4), _pair(SQRT3_2, 0.5, copies=2))  # same ratio 6, same EMD
    plain = entanglement(*_sets(CLASS_0, CLASS_1))
    doubled = entanglement(*_sets(CLASS_0, bigger_1))
    assert doubled["variance_classwise"] == pytest.approx(plain["variance_classwise"])
    assert doubled["wasserstein_classwise"] == pytest.approx(plain["wasserstein_classwise"])
    assert plain["variance_classwise_weighted"] == pytest.approx((28 * 4 + 6 * 6) / 10)  # 14.8
    assert doubled["variance_classwise_weighted"] == pytest.approx((28 * 4 + 6 * 12) / 16)  # 11.5
    assert doubled["wasserstein_classwise_weighted"] == pytest.approx((W_0 * 4 + W_1 * 12) / 16)


@pytest.mark.parametrize("cos_gap, raw", [(0.1, 4 * 1.99 / 0.01), (0.05, 4 * 1.9975 / 0.0025), (1.0, 4.0)])
def test_bounded_variance_is_the_raw_ratio_over_1300_clipped(cos_gap, raw):
    # retain (0, +-1), forget (c, +-sqrt(1 - c^2)): intra = 1 + (1 - c^2), inter = c^2 / 4,
    # ratio 4 (2 - c^2) / c^2: 796 (inside the scale), 3196 (above it: clipped to 1), 4
    c = cos_gap
    scores = entanglement(*_sets((0, _pair(0.0, 1.0), _pair(c, math.sqrt(1 - c * c)))))
    assert scores["variance"] == pytest.approx(raw)
    assert scores["variance_bounded"] == pytest.approx(min(1.0, raw / 1300))
    assert 0.0 <= scores["variance_bounded"] <= 1.0


def test_coinciding_means_read_fully_entangled_globally_and_drop_the_class_when_weighted():
    # retain and forget are the same two points: inter-set variance 0
    same = (0, _pair(0.0, 1.0), _pair(0.0, 1.0))
    assert entanglement(*_sets(same))["variance_bounded"] == 1.0  # no separation at all: the top of the scale
    scores = entanglement(*_sets(same, CLASS_1))
    # the undefined class-0 ratio is left out of the weighted mean rather than dominating it
    assert scores["weighted_classes"]["variance"] == [1]
    assert scores["variance_classwise_weighted"] == pytest.approx(VAR_1)


def test_no_eligible_class_gives_nan():
    # one example per class in each set: no class qualifies for Wasserstein; the variance ratio of
    # two single points is 0 (no intra variance), and the bounded and weighted ones follow
    scores = entanglement(np.array([[1.0, 0.0]]), np.array([0]), np.array([[0.0, 1.0]]), np.array([1]))
    assert math.isnan(scores["variance_classwise_weighted"])
    assert math.isnan(scores["variance_classwise_weighted_bounded"])
    assert math.isnan(scores["wasserstein_classwise_weighted"])
    assert scores["variance_bounded"] == 0.0


def test_bounded_scores_stay_in_unit_interval_on_random_features():
    rng = np.random.default_rng(3)
    for trial in range(5):
        retain, forget = rng.normal(size=(60, 8)), rng.normal(size=(30, 8)) + trial
        scores = entanglement(retain, rng.integers(0, 3, 60), forget, rng.integers(0, 3, 30), seed=trial)
        for key in ("variance_bounded", "variance_classwise_weighted_bounded", "wasserstein_classwise_weighted"):
            assert 0.0 <= scores[key] <= 1.0, (trial, key, scores[key])
        assert scores["variance_classwise_weighted"] >= 0.0


def test_raw_scores_are_unchanged_by_the_additions():
    """The raw global score of the 2-class configuration above, computed by hand."""
    retain, r_labels, forget, f_labels = _sets(CLASS_0, CLASS_1)
    # retain: (0,+-1) x3 each -> mean (0,0), intra 1; forget: (1/2, +-sqrt3/2), (sqrt3/2, +-1/2) -> mean
    # ((1/2 + sqrt3/2)/2, 0), intra = 1 - mean_x^2; mu = 4 * mean_x / 10
    mean_x = (0.5 + SQRT3_2) / 2
    mu = 4 * mean_x / 10
    expected = (1 + 1 - mean_x ** 2) / (0.5 * (mu ** 2 + (mean_x - mu) ** 2))
    assert entanglement(retain, r_labels, forget, f_labels)["variance"] == pytest.approx(expected)
    assert set(PAPER_SCALE_SCORES) == {"variance_bounded", "variance_classwise_weighted",
                                       "variance_classwise_weighted_bounded", "wasserstein_classwise_weighted"}


# ------------------------------------------------------------------ where users meet them
NEW_NAMES = [f"entanglement_{name}" for name in PAPER_SCALE_SCORES]
TINY_RUN = ["tracking.enabled=false", "device=cpu", "train.epochs=2", "data.batch_size=64", "model.name=small_cnn",
            "model.options={width: 8, feature_dim: 32}", "train.checkpoint_every=0"]


@pytest.mark.slow  # a tiny pretraining and two evaluations: ~30 s alone, minutes under load
def test_evaluate_entanglement_reports_the_paper_scale_scores(tmp_path, capsys):
    """``sharp-unlearn evaluate --metrics entanglement`` on a tiny pretrained digits model: rows and headline."""
    import json

    from sharp_unlearn.cli import main
    from sharp_unlearn.config import load_config
    from sharp_unlearn.recipes.pretrain import train_from_scratch

    pre = train_from_scratch(load_config([], [f"output_dir={tmp_path / 'runs'}", *TINY_RUN]), quiet=True,
                             use_cache=False)
    code = main(["evaluate", str(pre.checkpoint), "--metrics", "entanglement", "--out", str(tmp_path / "eval"),
                 "--no-tracking", "--json", "--eval-option", "wasserstein_max_per_set=100",
                 "forget.kind=random", "forget.size=60"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    reply = json.loads(captured.out)
    values = {v["metric"]: v["value"] for v in reply["values"] if v["split"] == "retain-forget"}
    for name in NEW_NAMES:
        assert name in values and name in reply["headline"], name
        assert reply["headline"][name] == pytest.approx(values[name])
    # the paper-scale scores relate to the raw ones as defined (random forget set: every class is in both sets)
    assert values["entanglement_variance_bounded"] == pytest.approx(min(1.0, values["entanglement_variance"] / 1300))
    for name in ("entanglement_variance_bounded", "entanglement_variance_classwise_weighted_bounded",
                 "entanglement_wasserstein_classwise_weighted"):
        assert 0.0 <= values[name] <= 1.0, (name, values[name])
    # the command's table (text output) names them too
    code = main(["evaluate", str(pre.checkpoint), "--metrics", "entanglement", "--out", str(tmp_path / "eval2"),
                 "--no-tracking", "--eval-option", "wasserstein_max_per_set=100", "forget.kind=random",
                 "forget.size=60"])
    text = capsys.readouterr().out
    assert code == 0
    assert all(name in text.replace("\n", "") or name.replace("_", "") in text.replace("\n", "").replace(" ", "")
               for name in NEW_NAMES), text


@pytest.mark.slow  # a tiny demo (two trainings, a reference, one unlearning run) and MLflow's SQLite start-up
def test_demo_logs_the_paper_scale_scores_to_its_unlearning_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    from sharp_unlearn.recipes.demo import run_demo

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    result = run_demo(None, ["base.train.epochs=2", "base.model.options={width: 8, feature_dim: 32}",
                             "pretrain_optimizers=[sgd]", "unlearn_optimizers=[sgd]", "evaluate=[entanglement]"],
                      output_dir=str(tmp_path / "runs"), tracking={"uri": uri}, methods=["neggrad"], quiet=True)
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    unlearn = [r for r in runs if r.data.tags.get("kind") == "unlearn"]
    assert len(unlearn) == 1
    evaluated = [row for row in result.evaluation if row.get("method") == "neggrad"]
    assert len(evaluated) == 1
    for name in ("entanglement_variance", *NEW_NAMES):
        assert unlearn[0].data.metrics[name] == pytest.approx(evaluated[0][name]), name


def test_demo_terminal_table_leaves_the_paper_scale_scores_to_the_files(monkeypatch, capsys):
    """Four more columns would fold the demo's evaluation numbers at 100 columns; they stay in MLflow/Parquet."""
    from pathlib import Path

    from sharp_unlearn.commands.demo import print_demo
    from sharp_unlearn.recipes.demo import DemoResult

    monkeypatch.setenv("COLUMNS", "100")
    evaluation = [{"seed": 0, "level": "high", "pretrain": pre, "method": "sharp_minmax",
                   "unlearn_opt": "sam-min/sam-max",
                   "mia_efficacy": 0.5123, "mia_auc": 0.61, "mia_tpr_at_1fpr": 0.0123,
                   "entanglement_variance": 167.98123, "entanglement_wasserstein": 0.00012345,
                   **{name: 0.123456 for name in NEW_NAMES}, "sharpness_hessian": 153.2, "sharpness_sam": 1.40567}
                  for pre in ("sgd", "sam")]
    print_demo(DemoResult(rows=[], results_path=Path("r.parquet"), markdown_path=Path("r.md"), evaluation=evaluation))
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert out.count("1.4057") == 2 and "0.1235" not in out  # whole numbers; the new scores not in the table
