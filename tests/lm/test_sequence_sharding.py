"""How the sharded engine weighs each rank's slice of a sequence batch (no process group needed):
the ranks' weighted token-mean losses average to the full batch's token mean, which weighting by
rows does not give when answers differ in length; NPO's per-sequence loss is weighted by rows."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from sharp_unlearn.engine.deepspeed_engine import DeepSpeedTrainer
from sharp_unlearn.engine.objective import Batch
from sharp_unlearn.losses import IGNORE_INDEX, cross_entropy


class FixedLogits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.logits[rows]


def sequence_batch() -> Batch:
    gen = torch.Generator().manual_seed(0)
    labels = torch.full((5, 6), IGNORE_INDEX)
    for row, (start, length) in enumerate([(1, 1), (2, 4), (1, 2), (3, 3), (0, 5)]):  # answers of 1..5 tokens
        labels[row, start:start + length] = torch.randint(0, 7, (length,), generator=gen)
    # x indexes the model's fixed logits, so a slice of the batch sees its own rows' logits
    return Batch(torch.arange(5), labels, torch.arange(5))


def rank_average(batch: Batch, model, mean_over: str, world: int = 2) -> float:
    total = 0.0
    for rank in range(world):
        local, weight = DeepSpeedTrainer._local(SimpleNamespace(world=world, rank=rank, input_dtype=None),
                                                batch, mean_over)
        total += weight * float(cross_entropy(model, local))
    return total / world  # DeepSpeed averages the ranks' gradients (and the engine their losses)


def test_ranks_weighted_by_scored_tokens_average_to_the_full_batch_token_mean():
    model = FixedLogits(torch.randn(5, 6, 7, generator=torch.Generator().manual_seed(1)))
    batch = sequence_batch()
    full = float(cross_entropy(model, batch))
    assert abs(rank_average(batch, model, "labels") - full) < 1e-6
    # rows as the unit (the old weighting) is off for this batch: 3 rows hold 7 tokens, 2 rows 8
    assert abs(rank_average(batch, model, "examples") - full) > 1e-3


def test_class_labels_weigh_a_rank_by_its_rows_either_way():
    batch = Batch(torch.arange(5), torch.tensor([0, 3, 1, 2, 4]), torch.arange(5))
    for rank in range(2):
        ns = SimpleNamespace(world=2, rank=rank, input_dtype=None)
        assert DeepSpeedTrainer._local(ns, batch, "labels")[1] == DeepSpeedTrainer._local(ns, batch, "examples")[1]
