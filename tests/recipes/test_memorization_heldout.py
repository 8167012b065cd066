"""The held-out estimator end to end on digits (in-process executor; Ray in tests/integration)."""
from __future__ import annotations

import numpy as np
import pytest

from sharp_unlearn.config import load_config
from sharp_unlearn.data import build_dataset
from sharp_unlearn.data.memorization import auroc, heldout_estimate, read_scores
from sharp_unlearn.recipes.memorization import compute_memorization
from sharp_unlearn.recipes.memorization_heldout import HeldoutSettings, default_run_dir, model_path, run_heldout

#: a recipe that memorizes flipped digits labels within ~1 s per model (adam, constant lr, no decay)
MEMORIZING = ["model.name=mlp", "model.options={hidden: [256, 256]}", "optimizer.name=adam",
              "optimizer.lr=0.005", "optimizer.weight_decay=0", "train.schedule=constant", "train.epochs=30"]


@pytest.fixture
def mem_cfg(tmp_path):
    def make(*overrides, tracking=False):
        base = [f"output_dir={tmp_path / 'runs'}", f"tracking.enabled={str(tracking).lower()}",
                "data.label_noise=0.05", "model.name=mlp", "model.options={hidden: [32]}", "train.epochs=5"]
        return load_config([], base + list(overrides))

    return make


def serial(k: int, **kwargs) -> HeldoutSettings:
    return HeldoutSettings(num_models=k, executor="serial", **kwargs)


def test_reproducible_under_a_seed(mem_cfg, tmp_path):
    cfg = mem_cfg()
    a = run_heldout(cfg, serial(3), run_dir=tmp_path / "a", quiet=True)
    b = run_heldout(cfg, serial(3), run_dir=tmp_path / "b", quiet=True)
    assert a.trained == b.trained == [0, 1, 2]
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.train_correct, b.train_correct)
    np.testing.assert_array_equal(a.test_correct, b.test_correct)
    other = run_heldout(mem_cfg("seed=1"), serial(3), run_dir=tmp_path / "c", quiet=True)
    assert (other.masks != a.masks).any()
    assert (other.train_correct != a.train_correct).any()
    # the models differ from each other (own subset, own seed) yet each learned something
    assert (a.train_correct[0] != a.train_correct[1]).any()
    assert a.test_correct.mean() > 0.5


class Interrupt(RuntimeError):
    pass


def test_interrupted_run_resumes_training_only_the_missing_models(mem_cfg, tmp_path):
    cfg = mem_cfg()
    run_dir = tmp_path / "run"
    done: list[int] = []

    def stop_after_two(outcome):
        done.append(outcome.model_id)
        if len(done) == 2:
            raise Interrupt("injected after 2 models")

    with pytest.raises(Interrupt):
        run_heldout(cfg, serial(5), run_dir=run_dir, quiet=True, on_model_done=stop_after_two)
    files = sorted(p.name for p in (run_dir / "models").iterdir())
    assert files == ["model-00000.npz", "model-00001.npz"]  # no temp files, no half files
    stamps = {name: (run_dir / "models" / name).stat().st_mtime_ns for name in files}

    trained_now: list[int] = []
    resumed = run_heldout(cfg, serial(5), run_dir=run_dir, quiet=True,
                          on_model_done=lambda o: trained_now.append(o.model_id))
    assert trained_now == resumed.trained == [2, 3, 4]
    assert resumed.reused == [0, 1]
    assert {name: (run_dir / "models" / name).stat().st_mtime_ns for name in files} == stamps

    # the resumed estimate equals an uninterrupted run's
    fresh = run_heldout(cfg, serial(5), run_dir=tmp_path / "fresh", quiet=True)
    np.testing.assert_array_equal(resumed.masks, fresh.masks)
    np.testing.assert_array_equal(resumed.train_correct, fresh.train_correct)

    # a larger K trains only the new models; --no-resume retrains everything
    grown = run_heldout(cfg, serial(6), run_dir=run_dir, quiet=True)
    assert grown.trained == [5] and grown.reused == [0, 1, 2, 3, 4]
    again = run_heldout(cfg, serial(2, resume=False), run_dir=run_dir, quiet=True)
    assert again.trained == [0, 1]


def test_model_files_of_another_recipe_are_not_reused(mem_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run_heldout(mem_cfg(), serial(2), run_dir=run_dir, quiet=True)
    other = run_heldout(mem_cfg("optimizer.lr=0.01"), serial(2), run_dir=run_dir, quiet=True)
    assert other.trained == [0, 1] and other.reused == []
    assert model_path(run_dir, 0).exists()


@pytest.mark.slow
def test_flipped_labels_get_the_highest_scores(mem_cfg, tmp_path):
    """Digits with 5 % flipped labels: held-out AUROC >= 0.9 at K=12; stderr shrinks with K;
    the table, the proxies' agreement and the MLflow run are all written."""
    import mlflow

    cfg = mem_cfg(*MEMORIZING, tracking=True)
    result = compute_memorization(cfg, serial(12), proxies=("loss", "learning_speed"), quiet=True)
    bundle = build_dataset(cfg.data, cfg.seed)
    flipped = bundle.meta["flipped"]
    assert len(flipped) == 63
    assert result.summary["flipped_auroc"] >= 0.9
    assert auroc(result.estimate.score, flipped) == result.summary["flipped_auroc"]
    # flipped labels are fit when seen and never when held out
    assert result.estimate.p_in[flipped].mean() > 0.6 > 0.2 > result.estimate.p_out[flipped].mean()
    # the proxies rank like the held-out estimate and find the flips too
    assert result.summary["spearman_loss"] > 0.3 and result.summary["spearman_learning_speed"] > 0.3
    assert result.summary["flipped_auroc_loss"] >= 0.9

    index, score = read_scores(result.scores_path, num_examples=len(bundle.train_targets))
    np.testing.assert_allclose(score, result.estimate.score)

    # the standard error shrinks as K grows (estimates from the first 3, 6, 12 models)
    stacked = run_heldout(cfg, serial(12), run_dir=default_run_dir(cfg, 0.7), quiet=True)
    assert stacked.trained == []  # all 12 on disk
    mean_se = [heldout_estimate(stacked.masks[:k], stacked.train_correct[:k]).stderr.mean() for k in (3, 6, 12)]
    assert mean_se[0] > mean_se[1] > mean_se[2]

    run = mlflow.tracking.MlflowClient().get_run(result.summary["run_id"])
    assert run.data.tags["kind"] == "memorization"
    assert run.data.metrics["flipped_auroc"] == pytest.approx(result.summary["flipped_auroc"])
    assert run.data.metrics["models_trained"] == 12
    assert run.data.params["memorization.num_models"] == "12"
    artifacts = [a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id)]
    assert "scores.parquet" in artifacts
