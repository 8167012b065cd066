"""A trial outside Ray (tuning/trainables.py): per-epoch reports, resume after a crash, the shared caches."""
from __future__ import annotations

from pathlib import Path

import pytest
from tuning.sweep_helpers import parse

from sharp_unlearn.tuning import LocalSession, run_trial, trial_configs


# ----------------------------------------------------------------- a trial outside Ray
class ResumingSession(LocalSession):
    """Restores from a given stage checkpoint, like a Ray trial retried after a crash."""

    def __init__(self, source: Path):
        super().__init__("resumed")
        self.source = source

    def restore(self, dest: Path) -> bool:
        import shutil

        shutil.copyfile(self.source, dest)
        return True


class CrashAfter(LocalSession):
    """Keeps a copy of the checkpoint reported at ``epoch`` and then dies (an exception)."""

    def __init__(self, epoch: int, keep: Path):
        super().__init__("crashing")
        self.epoch, self.keep = epoch, keep

    def report(self, metrics, checkpoint_file=None):
        super().report(metrics, checkpoint_file)
        if metrics["epoch"] == self.epoch:
            import shutil

            shutil.copyfile(checkpoint_file, self.keep)
            raise RuntimeError("worker died")


@pytest.mark.slow
def test_unlearn_trial_reports_every_epoch_and_resumes_from_its_checkpoint(tmp_path):
    from sharp_unlearn.tuning import prepare_inputs

    spec = parse(tmp_path, method={"name": "neggrad", "epochs": 4, "alpha": 0.9},
                 objective={"constraints": ["test_acc_drop <= 50"]})
    inputs, context = prepare_inputs(spec, quiet=True)
    inputs.ledger_dir = str(tmp_path / "ledger")
    assert context["reference"]["forget_acc"] < 20  # flipped labels: the reference cannot predict them
    params = {"method.alpha": 0.9}

    full = LocalSession("full")
    final = run_trial(inputs, params, full)
    assert [r["epoch"] for r in full.reports] == [1, 2, 3, 4]
    for report in full.reports:
        assert 0.0 <= report["tow"] <= 1.0
        assert report["test_acc_drop"] == pytest.approx(context["original"]["test_acc"] - report["test_acc"])
        penalty = 0.01 * max(0.0, report["test_acc_drop"] - 50)  # constraint test_acc_drop <= 50, weight 0.01
        assert report["objective"] == pytest.approx(report["tow"] - penalty)
    assert final["epoch"] == 4 and "train_loss" in final and "speedup_vs_retrain" in final

    keep = tmp_path / "epoch2.pt"
    with pytest.raises(RuntimeError, match="worker died"):
        run_trial(inputs, params, CrashAfter(2, keep))
    resumed = ResumingSession(keep)
    final_resumed = run_trial(inputs, params, resumed)
    assert [r["epoch"] for r in resumed.reports] == [3, 4]  # epochs 1-2 were not trained again
    # same seed, same data order, same state: the resumed run ends where the uninterrupted one did
    assert final_resumed["tow"] == pytest.approx(final["tow"], abs=1e-6)
    assert final_resumed["forget_acc"] == pytest.approx(final["forget_acc"], abs=1e-6)
    ledger = (tmp_path / "ledger" / "resumed.jsonl").read_text().splitlines()
    assert '"start_epoch": 2' in ledger[0]

    _, cfg = trial_configs(inputs, params)
    assert cfg.tracking.enabled is False and cfg.train.checkpoint_every == 1


@pytest.mark.slow
def test_pretrain_and_both_trials_use_the_shared_cache(tmp_path):
    from sharp_unlearn.tuning import prepare_inputs

    pre_spec = parse(tmp_path, stage="pretrain", forget=None, method=None, unlearn=None,
                     search={"optimizer": {"grid": [{"name": "sgd"}, {"name": "sam", "rho": 0.05}]}})
    inputs, _ = prepare_inputs(pre_spec)
    inputs.ledger_dir = str(tmp_path / "ledger")
    first = LocalSession("p1")
    final = run_trial(inputs, {"optimizer": {"name": "sam", "rho": 0.05}}, first)
    assert [r["epoch"] for r in first.reports] == [1, 2, 3]
    assert final["objective"] == final["val_acc"] and "test_acc" in final  # default objective of stage pretrain
    again = LocalSession("p2")  # same config: the cached model, no training, one final report
    assert run_trial(inputs, {"optimizer": {"name": "sam", "rho": 0.05}}, again)["val_acc"] == final["val_acc"]
    assert [r["epoch"] for r in again.reports] == [3]
    assert '"cached": true' in (tmp_path / "ledger" / "p2.jsonl").read_text()

    both = parse(tmp_path, stage="both", search={"pretrain.optimizer": {"grid": [{"name": "sam", "rho": 0.05}]},
                                                  "method.alpha": {"grid": [0.9, 0.95]}})
    inputs, _ = prepare_inputs(both)
    session = LocalSession("b1")
    result = run_trial(inputs, {"pretrain.optimizer": {"name": "sam", "rho": 0.05}, "method.alpha": 0.95}, session)
    # the pretraining above is reused (same config): its cache dir holds exactly one model of that config
    cached = list((tmp_path / "runs" / "pretrain").glob("digits-small_cnn-sam-*"))
    assert len(cached) == 1
    assert [r["epoch"] for r in session.reports] == [1, 2, 3] and 0.0 <= result["tow"] <= 1.0
    references = list((tmp_path / "runs" / "retrain").glob("digits-small_cnn-sam-*"))
    assert len(references) == 1  # the trial's own reference, trained with its own pretraining recipe
