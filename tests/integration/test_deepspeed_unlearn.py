"""`sharp-unlearn unlearn ... distributed.backend=deepspeed`: the method's phases run ZeRO-sharded on
2 torchrun workers (gloo, fp32) and give the same unlearned weights, and the same per-epoch metrics
(accuracies and ToW, measured sharded by the workers), as single-process unlearning.

Tolerance 1e-5 (absolute, per parameter): fp32, an MLP without BatchNorm, clipping off; the sharded
run sees the same global batches (``data.batch_size`` per rank x 2 ranks) as the single process.
"""
from __future__ import annotations

import json

import pytest

from sharp_unlearn.cli import main
from sharp_unlearn.config import load_config
from sharp_unlearn.engine.checkpoint import load_checkpoint

TOLERANCE = 1e-5
PER_RANK = 32
WORLD = 2
METHOD_CASES = {
    "sharp_minmax": ["method.name=sharp_minmax", "method.mask_fraction=0.5", "optimizer.name=sam",
                     "optimizer.rho=0.05"],
    "neggrad-sam": ["method.name=neggrad", "optimizer.name=sam", "optimizer.rho=0.05"],
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from sharp_unlearn.recipes.pretrain import train_from_scratch

    out = tmp_path_factory.mktemp("ds-unlearn")
    cfg = load_config([], [f"output_dir={out / 'runs'}", "tracking.enabled=false", "device=cpu", "train.epochs=1",
                           "data.batch_size=64", "model.name=mlp", "model.options={hidden: [32]}",
                           "train.checkpoint_every=0", "optimizer.name=sgd", "optimizer.lr=0.05"])
    outcome = train_from_scratch(cfg, quiet=True, use_cache=False)
    return {"checkpoint": outcome.checkpoint, "dir": out}


def _overrides(case: str, out_dir, batch_size: int) -> list[str]:
    return ["forget.kind=random", "forget.size=60", "method.epochs=2", "optimizer.lr=0.05", "train.grad_clip=0",
            "train.checkpoint_every=0", f"data.batch_size={batch_size}", f"output_dir={out_dir}",
            *METHOD_CASES[case]]


def _single_process(pretrained, case):
    from sharp_unlearn.recipes.unlearn import load_pretrained, run_unlearning, unlearn_config

    loaded = load_pretrained(pretrained["checkpoint"])
    cfg = load_config([], _overrides(case, pretrained["dir"] / "runs", PER_RANK * WORLD) +
                      ["tracking.enabled=false"], base=unlearn_config(loaded))
    records: dict[int, dict[str, float]] = {}
    outcome = run_unlearning(cfg, pretrained["checkpoint"], quiet=True, pretrained=loaded,
                             epoch_callback=lambda epoch, record: records.__setitem__(epoch, dict(record)))
    return outcome, records


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_sharded_unlearning_through_the_cli_equals_single_process(pretrained, case, capsys, tmp_path):
    reference, single_epochs = _single_process(pretrained, case)
    code = main(["unlearn", "--checkpoint", str(pretrained["checkpoint"]), "--json", "--quiet",
                 *_overrides(case, pretrained["dir"] / "runs", PER_RANK),
                 f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}",
                 "distributed.backend=deepspeed", "distributed.zero_stage=2", f"distributed.num_workers={WORLD}",
                 "distributed.launcher=torchrun"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-4000:]
    payload = json.loads(captured.out)
    metrics = payload["metrics"]
    assert "tow" in metrics and 0.0 <= metrics["tow"] <= 1.0
    # the same split and the same (cached) reference as the single-process run
    assert payload["split_hash"] == reference.split.split_hash
    assert payload["reference_checkpoint"] == str(reference.reference.checkpoint)
    sharded = load_checkpoint(payload["checkpoint"])["model"]
    single = load_checkpoint(reference.checkpoint)["model"]
    original = load_checkpoint(pretrained["checkpoint"])["model"]
    assert sharded.keys() == single.keys()
    moved = max(float((single[k] - original[k]).abs().max()) for k in single)
    assert moved > 1e-3  # the phases really changed the weights, so equality means something
    diff = max(float((sharded[k] - single[k]).abs().max()) for k in single)
    assert diff < TOLERANCE, (case, diff)
    assert metrics["forget_acc"] == pytest.approx(reference.metrics["forget_acc"], abs=1e-6)
    # the driver logged the run once, with the workers' per-epoch losses
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.method = '" + METHOD_CASES[case][0].split("=")[1] + "'")
    assert len(runs) == 1 and "tow" in runs[0].data.metrics
    assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 2
    # per-epoch metrics measured sharded by the workers equal the single-process run's epoch by epoch
    # (the last step also holds the driver's final measurement on the consolidated weights)
    assert sorted(single_epochs) == [1, 2]
    for key in ("tow", "retain_acc", "forget_acc", "val_acc", "test_acc"):
        by_step: dict[int, list[float]] = {}
        for metric in client.get_metric_history(runs[0].info.run_id, key):
            by_step.setdefault(metric.step, []).append(metric.value)
        assert sorted(by_step) == [0, 1, 2], key  # step 0: the model before unlearning
        for epoch, record in single_epochs.items():
            assert by_step[epoch] and all(abs(v - record[key]) < TOLERANCE for v in by_step[epoch]), \
                (case, key, epoch, by_step[epoch], record[key])


@pytest.mark.distributed
@pytest.mark.parametrize("bad, named", [("distributed.zero_stage=5", "zero_stage"),
                                        ("distributed.num_workers=64", "num_workers=64")])
def test_bad_distributed_input_fails_before_any_process(pretrained, capsys, bad, named):
    code = main(["unlearn", "--checkpoint", str(pretrained["checkpoint"]), "--quiet",
                 *_overrides("neggrad-sam", pretrained["dir"] / "bad", PER_RANK), "tracking.enabled=false",
                 "distributed.backend=deepspeed", "distributed.zero_stage=2", "distributed.num_workers=2",
                 "distributed.launcher=torchrun", bad])
    err = capsys.readouterr().err
    assert code == 2 and named in err
    assert not (pretrained["dir"] / "bad").exists()  # no split, reference or worker was made
