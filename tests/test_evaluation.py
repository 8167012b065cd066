"""``sharp-unlearn evaluate`` and the orchestration in ``sharp_unlearn.evaluation``."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sharp_unlearn.cli import main
from sharp_unlearn.config import load_config
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.evaluation import parse_metrics, run_metrics
from sharp_unlearn.metrics import EvalContext, EvalOptions
from sharp_unlearn.recipes.evaluate import evaluate_checkpoint
from sharp_unlearn.results import SCHEMA

FAST = ["--eval-option", "sharpness_samples=64", "--eval-option", "hessian_iters=5",
        "--eval-option", "wasserstein_max_per_set=200", "--eval-option", "mia_max_shadow=300"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pretrained digits checkpoint and an unlearning checkpoint (NegGrad+) made from it."""
    from sharp_unlearn.recipes.pretrain import train_from_scratch
    from sharp_unlearn.recipes.unlearn import load_pretrained, run_unlearning, unlearn_config

    out = tmp_path_factory.mktemp("eval")
    base = [f"output_dir={out / 'runs'}", "tracking.enabled=false", "device=cpu", "train.epochs=3",
            "data.batch_size=64", "model.name=small_cnn", "model.options={width: 8, feature_dim: 32}",
            "train.checkpoint_every=0"]
    pre = train_from_scratch(load_config([], base), quiet=True, use_cache=False)
    pretrained = load_pretrained(pre.checkpoint)
    cfg = load_config([], ["forget.kind=random", "forget.size=60", "method.name=neggrad", "method.epochs=1",
                           f"output_dir={out / 'runs'}", "tracking.enabled=false"],
                      base=unlearn_config(pretrained))
    outcome = run_unlearning(cfg, pre.checkpoint, quiet=True, pretrained=pretrained)
    return {"pretrain": pre.checkpoint, "unlearn": outcome.checkpoint, "outcome": outcome, "dir": out}


def _cli(capsys, *argv):
    code = main(["evaluate", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------ names
def test_parse_metrics_lists_choices_on_unknown_names():
    assert parse_metrics("mia, sharpness,mia") == ["mia", "sharpness"]
    assert parse_metrics("all")[:3] == ["accuracy", "tow", "mia"]
    with pytest.raises(ConfigError, match="unknown metric 'flatness'.*accuracy, tow, mia, entanglement, sharpness, "
                                          "landscape, umap"):
        parse_metrics("mia,flatness")
    with pytest.raises(ConfigError, match="no metric"):
        parse_metrics(" , ")


def test_eval_options_reject_bad_values():
    with pytest.raises(ConfigError, match="unknown eval option 'hessian_iter'.*hessian_iters"):
        EvalOptions.from_pairs(["hessian_iter=3"])
    with pytest.raises(ConfigError, match="sharpness_samples=0"):
        EvalOptions.from_pairs(["sharpness_samples=0"])
    with pytest.raises(ConfigError, match="sam_rho"):
        EvalOptions.from_pairs(["sam_rho=-1"])
    assert EvalOptions.from_pairs(["sam_rho=0.1", "landscape_points=5"]).landscape_points == 5


# ------------------------------------------------------------------ shared predictions
def test_predictions_are_extracted_once_per_split_and_shared(trained):
    from sharp_unlearn.recipes.evaluate import prepare_target

    target = prepare_target(trained["unlearn"])
    ctx = EvalContext(target.model, target.splits, reference=target.reference,
                      options=EvalOptions(sharpness_samples=32, hessian_iters=3, wasserstein_max_per_set=100))
    result = run_metrics(ctx, ["accuracy", "tow", "mia", "entanglement"])
    assert ctx.prediction_passes == {"retain": 1, "forget": 1, "test": 1, "val": 1}
    # accuracy from the shared tensors equals the unlearning recipe's own measurement
    for split in ("retain", "forget", "test"):
        assert result.value(f"{split}_acc", split) == pytest.approx(trained["outcome"].metrics[f"{split}_acc"])
    assert result.value("tow", "all") == pytest.approx(trained["outcome"].metrics["tow"])
    assert set(result.seconds) == {"accuracy", "tow", "mia", "entanglement"}


# ------------------------------------------------------------------ the command
@pytest.mark.slow  # MLflow's SQLite store takes ~15 s to initialise
def test_evaluate_unlearn_checkpoint_writes_the_long_table_and_logs_mlflow(trained, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "eval"
    code, stdout, err = _cli(capsys, trained["unlearn"], "--metrics", "accuracy,tow,mia,entanglement,sharpness",
                             "--out", out, "--tracking-uri", uri, "--json", *FAST)
    assert code == 0, err
    reply = json.loads(stdout)
    table = pq.read_table(out / "results.parquet")
    assert table.schema.equals(SCHEMA)
    rows = table.to_pylist()
    keyed = {(r["metric"], r["split"]): r for r in rows}
    for metric, split in [("mia_efficacy", "forget"), ("mia_auc", "forget"), ("mia_tpr_at_1fpr", "forget"),
                          ("entanglement_variance", "retain-forget"), ("entanglement_wasserstein", "retain-forget"),
                          ("sharpness_hessian", "forget"), ("sharpness_sam", "test"), ("tow", "all"),
                          ("forget_acc", "forget")]:
        assert (metric, split) in keyed, (metric, split)
    row = keyed[("tow", "all")]
    outcome = trained["outcome"]
    assert (row["run_id"], row["method"], row["optimizer"], row["forget_set"]) == (
        outcome.run_id or reply["run_id"], "neggrad", outcome.optimizer_tag, "random-60")
    assert row["value"] == pytest.approx(outcome.metrics["tow"])
    assert 0.0 <= keyed[("mia_efficacy", "forget")]["value"] <= 1.0

    run = MlflowClient(uri).get_run(reply["run_id"])
    for name in ("mia_efficacy", "mia_auc", "mia_tpr_at_1fpr", "entanglement_variance", "entanglement_wasserstein",
                 "sharpness_hessian", "sharpness_sam", "tow"):
        assert run.data.metrics[name] == pytest.approx(reply["headline"][name])
    retain_hessian = keyed[("sharpness_hessian", "retain")]["value"]
    assert run.data.metrics["sharpness_hessian/retain"] == pytest.approx(retain_hessian)
    assert run.data.tags["kind"] == "evaluate" and run.data.tags["method"] == "neggrad"
    assert run.data.tags["mia_attack"] == "reference-calibrated"  # the checkpoint names its reference
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(reply["run_id"], "results")}
    assert {"results/results.parquet", "results/details.json"} <= artifacts


def test_evaluate_pretrain_checkpoint_with_forget_overrides(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    # overrides after options still count (argparse alone would reject them)
    code, stdout, err = _cli(capsys, trained["pretrain"], "--metrics", "accuracy,mia,landscape", "--out", out,
                             "--no-tracking", "--quiet", *FAST, "--eval-option", "landscape_points=3",
                             "--eval-option", "landscape_samples=32", "forget.kind=random", "forget.size=60")
    assert code == 0, err
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert {r["method"] for r in rows} == {"original"}
    assert {r["forget_set"] for r in rows} == {"random-60"}
    # the same forget set the unlearning run used (same seed, same selection)
    forget_acc = next(r["value"] for r in rows if r["metric"] == "forget_acc")
    assert forget_acc == pytest.approx(trained["outcome"].original_metrics["forget_acc"])
    assert (out / "landscape.parquet").is_file() and (out / "figures" / "landscape_forget.png").is_file()
    details = json.loads((out / "details.json").read_text())
    assert details["prediction_passes"] == {"retain": 1, "forget": 1, "val": 1, "test": 1}


def test_auto_on_a_pretrain_checkpoint_skips_what_needs_a_forget_set(trained, tmp_path):
    outcome = evaluate_checkpoint(trained["pretrain"], "auto", out_dir=tmp_path,
                                  options=EvalOptions(sharpness_samples=32, hessian_iters=3),
                                  overrides=["tracking.enabled=false"])
    metrics = {v.metric for v in outcome.result.values}
    assert metrics == {"train_acc", "val_acc", "test_acc", "sharpness_hessian", "sharpness_sam"}
    assert {v.split for v in outcome.result.values if v.metric == "sharpness_sam"} == {"train", "test"}


# ------------------------------------------------------------------ bad input
def test_unknown_metric_exits_2_listing_the_choices(trained, capsys):
    code, _, err = _cli(capsys, trained["unlearn"], "--metrics", "mia,flatness", "--no-tracking")
    assert code == 2
    assert "unknown metric 'flatness'" in err and "entanglement, sharpness, landscape, umap" in err


def test_checkpoint_that_does_not_match_the_model_config_exits_2(trained, capsys):
    code, _, err = _cli(capsys, trained["pretrain"], "--no-tracking", "--metrics", "accuracy",
                        "model.options={width: 16, feature_dim: 32}")
    assert code == 2
    assert "does not match the model architecture" in err


def test_metrics_that_need_a_forget_set_or_a_reference_exit_2(trained, capsys):
    code, _, err = _cli(capsys, trained["pretrain"], "--no-tracking", "--metrics", "mia")
    assert code == 2 and "needs the split(s) retain, forget" in err and "forget.kind=random" in err
    code, _, err = _cli(capsys, trained["pretrain"], "--no-tracking", "--metrics", "tow",
                        "forget.kind=random", "forget.size=60", f"output_dir={trained['dir'] / 'elsewhere'}")
    assert code == 2 and "reference" in err


def test_pretrain_checkpoint_finds_the_cached_reference_of_its_split(trained, tmp_path):
    outcome = evaluate_checkpoint(trained["pretrain"], "tow", out_dir=tmp_path,
                                  overrides=["tracking.enabled=false", "forget.kind=random", "forget.size=60"])
    assert outcome.target.reference_checkpoint == trained["outcome"].reference.checkpoint
    # the "do nothing" row: the same ToW the unlearning recipe reported for the original model
    original = trained["outcome"].original_metrics
    reference = trained["outcome"].reference.metrics
    from sharp_unlearn.metrics.tow import tow

    assert outcome.result.value("tow", "all") == pytest.approx(tow(original, reference))


def test_forget_overrides_on_an_unlearn_checkpoint_and_wrong_reference_are_rejected(trained, capsys, tmp_path):
    code, _, err = _cli(capsys, trained["unlearn"], "--no-tracking", "forget.size=10")
    assert code == 2 and "its own forget set" in err
    # a reference retrained for another split is refused
    from sharp_unlearn.engine.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(trained["outcome"].reference.checkpoint)
    state["split_hash"] = "0123456789ab"
    other = save_checkpoint(tmp_path / "other_reference.pt", {k: v for k, v in state.items() if k != "format_version"})
    code, _, err = _cli(capsys, trained["unlearn"], "--no-tracking", "--metrics", "tow", "--reference", other)
    assert code == 2 and "retrained for split 0123456789ab" in err
    code, _, err = _cli(capsys, tmp_path / "missing.pt", "--no-tracking")
    assert code == 2 and "does not exist" in err


def test_a_checkpoint_for_another_number_of_classes_is_refused(trained, tmp_path, capsys):
    from sharp_unlearn.engine.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(trained["pretrain"])
    state["num_classes"] = 100
    bad = save_checkpoint(tmp_path / "bad.pt", {k: v for k, v in state.items() if k != "format_version"})
    code, _, err = _cli(capsys, bad, "--no-tracking", "--metrics", "accuracy")
    assert code == 2 and "100 classes" in err


def test_forget_positions_agree_with_the_unlearning_split(trained):
    from sharp_unlearn.recipes.evaluate import prepare_target

    target = prepare_target(trained["unlearn"])
    split = trained["outcome"].split
    assert target.splits["forget"].indices == split.forget_positions.tolist()
    assert np.array_equal(np.asarray(target.splits["retain"].indices), split.retain_positions)
    assert target.reference is not None and not target.reference.training
    assert torch.is_tensor(next(target.model.parameters()))
