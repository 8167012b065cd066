"""Sharded sweeps of stage ``pretrain`` and stage ``both`` through ``sharp-unlearn sweep`` (issue #12).

Every trial is a DeepSpeed ZeRO-2 job of 2 gloo CPU workers started by Ray Train inside the trial,
on a local 2-CPU Ray; MLP on digits, 2 trials, 2 epochs per stage, FIFO:

- stage ``pretrain`` (searching ``optimizer.lr``): every trial reports ``val_acc`` (the default
  objective of a pretraining sweep) per epoch, the table and the ledger name every trial once,
  ``best_config.yaml`` names the best trial's consolidated checkpoint and ``evaluate`` scores it;
- stage ``both`` (searching ``pretrain.optimizer.lr`` and ``method.alpha``, the same pretraining
  configs in the same ``output_dir``): the pretraining sweep's models are reused from the cache,
  each pretraining config's model and retrained reference exist once and were trained once,
  every trial reports its unlearning epochs (ToW per epoch), and ``evaluate`` of the best trial's
  checkpoint computes accuracy and ToW against that reference without training it again.

Trainings are counted from the Ray Train runs in each cached stage folder (``<run>/ray/<trial>-<stage>``):
one per training, whichever trial or sweep trained it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

# each sharded training starts 2 worker processes and a DeepSpeed engine: minutes on a loaded 2-core
# machine, and stage both trains up to three stages per trial (both tests: 536 s at load ~15, 2 Dec 2026)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(3600)]

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

EPOCHS = 2
LEARNING_RATES = [0.05, 0.1]
#: per worker: 2 workers x 32 = a global batch of 64
SHARDED = {"backend": "deepspeed", "zero_stage": 2, "num_workers": 2, "use_gpu": False, "timeout_s": 60}
BASE = {"seed": 0, "data": {"name": "digits", "label_noise": 0.05, "batch_size": 32, "augment": False},
        "model": {"name": "mlp", "options": {"hidden": [64]}},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
        "train": {"epochs": EPOCHS, "schedule": "cosine"}, "distributed": dict(SHARDED)}


def sweep_file(tmp_path: Path, output_dir: Path, name: str, **fields) -> Path:
    raw = {"name": name, "output_dir": str(output_dir), "base": BASE, "scheduler": "fifo", "num_samples": 1,
           "resources": {"cpu": 0.99}, "max_failures": 1, **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory):
    """One output_dir for the module: the stage-both sweep finds the pretraining sweep's models cached."""
    return tmp_path_factory.mktemp("sharded-stages") / "runs"


@pytest.fixture(autouse=True)
def _no_ray_left_behind():
    yield
    if ray.is_initialized():  # a failed test must not leave its Ray instance to the next one
        ray.shutdown()


def run_cli(capsys, *argv: str) -> dict:
    from sharp_unlearn.cli import main

    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-4000:]
    return json.loads(captured.out)


def ledger(storage: Path, name: str) -> dict[str, list[dict]]:
    out = {}
    for file in sorted((storage / name / "_sharp_unlearn" / "trainings").glob("*.jsonl")):
        out[file.stem] = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return out


def trainings(stage_folder: Path) -> list[str]:
    """The Ray Train runs that trained a cached sharded stage folder (one per training)."""
    ray_dir = stage_folder / "ray"
    return sorted(p.name for p in ray_dir.iterdir() if p.is_dir()) if ray_dir.is_dir() else []


def sharded_folders(output_dir: Path, kind: str) -> list[Path]:
    return sorted(p for p in (output_dir / kind).glob("*-zero2x2") if p.is_dir())


def epoch_steps(uri: str, metric: str) -> dict[str, list[int]]:
    """Each trial's MLflow child run: the epochs (steps) at which ``metric`` was reported."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sharp-unlearn")
    runs = client.search_runs([experiment.experiment_id], "tags.kind = 'trial'", max_results=1000)
    return {r.data.tags["trial_id"]: sorted(m.step for m in client.get_metric_history(r.info.run_id, metric))
            for r in runs}


def check_sweep_files(outcome: dict, storage: Path, name: str) -> tuple[dict, Path]:
    """Table, ledger and best config name every trial once; the best checkpoint exists. (best row, checkpoint)"""
    rows = outcome["rows"]
    trial_ids = sorted(r["trial_id"] for r in rows)
    assert len(trial_ids) == 2 and len(set(trial_ids)) == 2
    assert all(r["status"] == "TERMINATED" and r["epochs"] == EPOCHS for r in rows), rows
    table = (storage / name / "sweep_results.md").read_text()
    assert all(table.count(trial_id) == 1 for trial_id in trial_ids), table
    events = ledger(storage, name)
    assert sorted(events) == trial_ids
    for trail in events.values():  # one start (no retry), sharded, and one done at the last epoch
        starts = [e for e in trail if e["event"] == "start"]
        assert len(starts) == 1 and starts[0]["sharded"] and starts[0]["start_epoch"] == 0, trail
        assert [e["epoch"] for e in trail if e["event"] == "done"] == [EPOCHS], trail
    best = outcome["best"]
    best_cfg = yaml.safe_load(Path(outcome["best_config"]).read_text())
    assert best_cfg["trial_id"] == best["trial_id"]
    checkpoint = storage / name / "best_checkpoint.pt"
    assert outcome["best_checkpoint"] == str(checkpoint) == best_cfg["checkpoint"] and checkpoint.is_file()
    return best, checkpoint


def test_sharded_pretrain_sweep_reports_val_acc_and_its_best_checkpoint_evaluates(tmp_path, shared_runs, capsys):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    path = sweep_file(tmp_path, shared_runs, "pretrain_sharded", stage="pretrain",
                      search={"optimizer.lr": {"grid": LEARNING_RATES}})
    storage = tmp_path / "storage"
    outcome = run_cli(capsys, "sweep", str(path), "--num-cpus", "2", "--storage", str(storage),
                      "--tracking-uri", uri)

    best, checkpoint = check_sweep_files(outcome, storage, "pretrain_sharded")
    # a pretraining sweep's objective is val_acc (tuning/README.md), reported by every trial every epoch
    assert all(r["objective"] == r["val_acc"] for r in outcome["rows"])
    assert best["objective"] == max(r["val_acc"] for r in outcome["rows"])
    steps = epoch_steps(uri, "val_acc")
    assert sorted(steps) == sorted(r["trial_id"] for r in outcome["rows"])
    assert all(s == list(range(1, EPOCHS + 1)) for s in steps.values()), steps
    # one sharded pretraining folder per learning rate in the pretraining cache, each trained once
    folders = sharded_folders(shared_runs, "pretrain")
    assert len(folders) == 2 and all(len(trainings(f)) == 1 for f in folders), [trainings(f) for f in folders]
    best_cfg = yaml.safe_load(Path(outcome["best_config"]).read_text())
    assert best_cfg["config"]["distributed"]["backend"] == "deepspeed"
    assert best_cfg["config"]["optimizer"]["lr"] == best["optimizer.lr"]

    # the consolidated fp32 export loads on one device and scores what the trial reported
    evaluated = run_cli(capsys, "evaluate", str(checkpoint), "--metrics", "accuracy", "--no-tracking",
                        "--out", str(tmp_path / "eval"))
    for key in ("val_acc", "test_acc"):
        assert evaluated["headline"][key] == pytest.approx(best[key], abs=1e-4), key


def test_sharded_both_sweep_shares_pretrained_models_and_references(tmp_path, shared_runs, capsys):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    path = sweep_file(tmp_path, shared_runs, "both_sharded", stage="both",
                      forget={"kind": "memorization", "level": "high", "size": 30, "scores": "flipped"},
                      # the unlearning run inherits distributed.* from base: both stages shard alike
                      unlearn={"optimizer": {"lr": 0.02}, "train": {"schedule": "constant"}},
                      method={"name": "neggrad", "epochs": EPOCHS, "alpha": 0.95},
                      search={"pretrain.optimizer.lr": {"grid": LEARNING_RATES},
                              "method.alpha": {"uniform": [0.9, 0.99]}})
    storage = tmp_path / "storage"
    outcome = run_cli(capsys, "sweep", str(path), "--num-cpus", "2", "--storage", str(storage),
                      "--tracking-uri", uri)

    best, checkpoint = check_sweep_files(outcome, storage, "both_sharded")
    rows = outcome["rows"]
    assert sorted(r["pretrain.optimizer.lr"] for r in rows) == LEARNING_RATES
    assert all(0.0 <= r["tow"] <= 1.0 and r["objective"] == r["tow"] for r in rows)
    # unlearning: ToW reported every epoch by every trial (what ASHA would compare on)
    steps = epoch_steps(uri, "tow")
    assert sorted(steps) == sorted(r["trial_id"] for r in rows)
    assert all(s == list(range(1, EPOCHS + 1)) for s in steps.values()), steps
    # pretraining: one model per learning rate (trained once, by whichever sweep came first), each
    # evaluated every epoch; then one retrained reference per pretrained model, trained once
    pretrained = sharded_folders(shared_runs, "pretrain")
    assert len(pretrained) == 2 and all(len(trainings(f)) == 1 for f in pretrained)
    from sharp_unlearn.engine.checkpoint import load_checkpoint

    for folder in pretrained:
        history = load_checkpoint(folder / "checkpoint.pt")["history"]
        assert [int(r["epoch"]) for r in history] == list(range(1, EPOCHS + 1))
        assert all("val_acc" in r and "train_loss" in r for r in history), history
    references = sharded_folders(shared_runs, "retrain")
    assert len(references) == 2 and all(len(trainings(f)) == 1 for f in references)
    best_cfg = yaml.safe_load(Path(outcome["best_config"]).read_text())
    assert best_cfg["pretrain_config"]["optimizer"]["lr"] == best["pretrain.optimizer.lr"]
    assert best_cfg["config"]["distributed"]["backend"] == "deepspeed"

    # `evaluate` finds the reference the export names (one of the cached ones) and trains nothing
    export = load_checkpoint(checkpoint)
    assert Path(export["reference_checkpoint"]).parent in references
    evaluated = run_cli(capsys, "evaluate", str(checkpoint), "--metrics", "accuracy,tow", "--no-tracking",
                        "--out", str(tmp_path / "eval"))
    for key in ("test_acc", "forget_acc", "retain_acc", "tow"):
        assert evaluated["headline"][key] == pytest.approx(best[key], abs=1e-4), key
    assert sharded_folders(shared_runs, "retrain") == references
    assert all(len(trainings(f)) == 1 for f in references)
