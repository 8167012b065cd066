"""run_epochs on a backend: what the driver asks of a backend, and in which order."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from sharp_unlearn.data import build_dataset
from sharp_unlearn.engine.driver import LocalBackend, run_epochs
from sharp_unlearn.engine.objective import Objective, Phase
from sharp_unlearn.models import build_model


def ce(model, batch):
    return F.cross_entropy(model(batch.x), batch.y)


class RecordingBackend(LocalBackend):
    """The one-device backend, with every call the driver makes written to ``calls``; its eval
    model is a distinct object, so the test sees that evaluate gets the backend's, not the raw model."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple] = []

    @property
    def eval_model(self):
        self.calls.append(("eval_model",))
        return ("eval", self.model)

    def resume(self, meta):
        self.calls.append(("resume", meta.get("config_hash")))
        return super().resume(meta)

    def sync(self):
        self.calls.append(("sync",))

    def save(self, state):
        self.calls.append(("save", state.epoch, state.completed, [r["epoch"] for r in state.history]))
        super().save(state)

    def finish(self, state):
        self.calls.append(("finish", state.epoch, state.completed))
        return super().finish(state)


def test_driver_calls_the_backend_in_order(small_cfg, tmp_path):
    cfg = small_cfg("train.epochs=3", "train.checkpoint_every=2", "train.eval_every=0", "data.batch_size=256")
    bundle = build_dataset(cfg.data, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape)
    phase = Phase("pretrain", [Objective("ce", "train", ce)])
    backend = RecordingBackend(torch.device("cpu"), tmp_path / "stage.pt")
    seen: list[tuple] = []

    def evaluate(scored, epoch):
        backend.calls.append(("evaluate", epoch))
        assert scored == ("eval", model)
        return {"val_acc": 1.0}

    def on_epoch_end(epoch, record):
        backend.calls.append(("on_epoch_end", epoch))
        seen.append((epoch, dict(record)))

    result = run_epochs(model, lambda epoch: [phase], {"train": bundle.train}, backend=backend, cfg=cfg,
                        optimizer_cfg=cfg.optimizer, train_cfg=cfg.train, epochs=3,
                        checkpoint_meta={"config_hash": "h"}, evaluate=evaluate, quiet=True,
                        on_epoch_end=on_epoch_end)

    assert backend.calls == [
        ("resume", "h"),
        ("sync",), ("on_epoch_end", 1),
        # a checkpoint every 2 epochs, written before that epoch's on_epoch_end
        ("sync",), ("save", 2, False, [1, 2]), ("on_epoch_end", 2),
        # only the last epoch is evaluated (eval_every=0), after sync; the final save comes before its callback
        ("sync",), ("eval_model",), ("evaluate", 3), ("finish", 3, True), ("save", 3, True, [1, 2, 3]),
        ("on_epoch_end", 3),
    ]
    assert result.checkpoint == tmp_path / "stage.pt" and result.resumed_from == 0
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert "val_acc" in result.history[-1] and "val_acc" not in result.history[0]
    assert [epoch for epoch, _ in seen] == [1, 2, 3] and seen[-1][1]["val_acc"] == 1.0
