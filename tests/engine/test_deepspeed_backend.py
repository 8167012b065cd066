"""Sharded evaluation: the single-process metric code run on a RowShardedModel gives the
single-process numbers on every rank (2 and 3 gloo processes, batches that do not split evenly)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset


class Rows(Dataset):
    """Items as the project's data sets give them: (x, y, index)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


class Bundle:
    """The three splits ``split_accuracies`` reads."""

    def __init__(self):
        self.train_eval, self.val, self.test = Rows(53, 1), Rows(17, 2), Rows(1, 3)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


FORGET = np.array([0, 5, 9, 40, 52])
RETAIN = np.setdiff1d(np.arange(53), FORGET)
# batch sizes: smaller than the world (empty slices), uneven, and larger than a split
BATCH_SIZES = (1, 7, 64)


def expected() -> dict[str, dict[str, float]]:
    from sharp_unlearn.metrics.accuracy import split_accuracies

    model, bundle = make_model(), Bundle()
    return {str(bs): split_accuracies(model, bundle, FORGET, RETAIN, "cpu", bs) for bs in BATCH_SIZES}


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    from sharp_unlearn.engine.deepspeed_backend import RowShardedModel, distributed_accuracy
    from sharp_unlearn.metrics.accuracy import split_accuracies

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, bundle = make_model(), Bundle()
        got = {str(bs): split_accuracies(RowShardedModel(model), bundle, FORGET, RETAIN, "cpu", bs)
               for bs in BATCH_SIZES}
        model.train()  # predict leaves a model in eval mode; distributed_accuracy gives the mode back
        got["distributed_accuracy"] = {"val_acc": distributed_accuracy(model, bundle.val, 5),
                                       "training_after": float(model.training)}
        with open(f"{out_dir}/rank{rank}.json", "w") as handle:
            json.dump(got, handle)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_row_sharded_metrics_equal_single_process_on_every_rank(tmp_path, free_port, world):
    from sharp_unlearn.engine.loop import accuracy

    mp.spawn(worker, args=(world, free_port, str(tmp_path)), nprocs=world, join=True)
    want = expected()
    assert 0.0 < want["7"]["forget_acc"] < 100.0 or 0.0 < want["7"]["retain_acc"] < 100.0  # not trivially 0/100
    val_acc = accuracy(make_model(), Bundle().val, 5)
    for rank in range(world):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for bs in BATCH_SIZES:
            assert got[str(bs)].keys() == want[str(bs)].keys()
            for key, value in want[str(bs)].items():
                assert got[str(bs)][key] == pytest.approx(value, abs=1e-9), (rank, bs, key)
        assert got["distributed_accuracy"]["val_acc"] == pytest.approx(val_acc, abs=1e-9)
        assert got["distributed_accuracy"]["training_after"] == 1.0  # the module's mode is given back
