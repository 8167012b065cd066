"""`sharp-unlearn mask`: one file per fraction for the recipe's forget split, logged to MLflow."""
from __future__ import annotations

import json
import os

import pytest
import torch

from sharp_unlearn.cli import main
from sharp_unlearn.optim.saliency import load_mask, mask_fraction


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from sharp_unlearn.config import load_config
    from sharp_unlearn.recipes.pretrain import train_from_scratch

    out = tmp_path_factory.mktemp("pre")
    cfg = load_config([], [f"output_dir={out}", "tracking.enabled=false", "train.epochs=1", "device=cpu",
                           "model.name=small_cnn", "model.options={width: 4, feature_dim: 16}"])
    return train_from_scratch(cfg, quiet=True).checkpoint


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow  # MLflow's sqlite store takes ~10 s to create
def test_mask_command_writes_and_logs_masks(checkpoint, tmp_path, capsys):
    out = tmp_path / "masks"
    code, stdout, err = run_cli(capsys, "mask", "--checkpoint", str(checkpoint), "--fractions", "0.1,0.3",
                                "--out", str(out), "--json", "--quiet", f"output_dir={tmp_path}",
                                "tracking.enabled=true", "forget.kind=random", "forget.size=40")
    assert code == 0, err
    result = json.loads(stdout)
    assert sorted(result["masks"]) == ["0.1", "0.3"]
    masks = {}
    for key, path in result["masks"].items():
        mask, meta = load_mask(path)
        masks[key] = mask
        assert meta["fraction"] == float(key)
        assert meta["split_hash"] == result["split_hash"] and meta["forget_size"] == 40
        assert meta["forget_set"] == "random-40"
        assert mask_fraction(mask) == pytest.approx(float(key), abs=1e-3)
    for name in masks["0.1"]:  # nested: the 10 % mask lies inside the 30 % one
        assert bool((masks["0.1"][name] <= masks["0.3"][name]).all())
    assert (out / "forget_set.parquet").is_file()

    # the same masks as a direct computation on the same split
    from sharp_unlearn.engine.saliency import forget_gradient_saliency
    from sharp_unlearn.metrics.accuracy import subset
    from sharp_unlearn.optim.saliency import saliency_mask
    from sharp_unlearn.recipes.memorization import select_forget_set
    from sharp_unlearn.recipes.unlearn import load_pretrained

    pretrained = load_pretrained(checkpoint)
    model = pretrained.model("cpu")
    from sharp_unlearn.config import ForgetConfig

    split = select_forget_set(ForgetConfig(kind="random", size=40), pretrained.bundle, pretrained.cfg.seed,
                              model=model, run_cfg=pretrained.cfg)
    assert split.split_hash == result["split_hash"]
    direct = saliency_mask(forget_gradient_saliency(model, subset(pretrained.bundle.train_eval,
                                                                  split.forget_positions)), 0.3)
    assert all(torch.equal(direct[n], masks["0.3"][n]) for n in direct)

    # MLflow: a kind=mask run with the files as artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(result["run_id"])
    assert run.data.tags["kind"] == "mask" and run.data.tags["split_hash"] == result["split_hash"]
    assert run.data.tags["forget_set"] == "random-40"
    assert run.info.status == "FINISHED"
    logged = sorted(a.path for a in client.list_artifacts(result["run_id"], "masks"))
    assert logged == ["masks/mask-random-40-f0.1.pt", "masks/mask-random-40-f0.3.pt"]


@pytest.mark.parametrize("argv,match", [
    (["--fractions", "0.1,1.5"], "out of range"),
    (["--fractions", "0.1,abc"], "not a number"),
    (["--fractions", "0.2", "forget.size=100000"], "larger than the training set"),
    (["--fractions", "0.2", "model.options={width: 8, feature_dim: 16}"], "architecture"),
])
def test_bad_input_exits_2_and_writes_nothing(checkpoint, tmp_path, capsys, argv, match):
    out = tmp_path / "masks"
    code, _, err = run_cli(capsys, "mask", "--checkpoint", str(checkpoint), "--out", str(out), "--no-tracking",
                           f"output_dir={tmp_path}", "forget.kind=random", "forget.size=40", *argv)
    assert code == 2
    assert match in err
    assert not out.exists()


def test_missing_forget_set_is_bad_input(checkpoint, tmp_path, capsys):
    code, _, err = run_cli(capsys, "mask", "--checkpoint", str(checkpoint), "--no-tracking",
                           f"output_dir={tmp_path}")
    assert code == 2 and "forget set" in err
