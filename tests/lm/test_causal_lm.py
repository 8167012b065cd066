"""Causal LM tensors and loss: only answer tokens are scored."""
from __future__ import annotations

import torch

from sharp_unlearn.data.qa import QARow
from sharp_unlearn.engine.objective import Batch
from sharp_unlearn.losses import IGNORE_INDEX, cross_entropy
from sharp_unlearn.models.causal_lm import QADataset, WordTokenizer, tiny_gpt

ROWS = [QARow("where was ana born ?", "ana was born in rome", "ana"),
        QARow("what does bo do ?", "bo works as a baker", "bo")]


def _setup():
    tokenizer = WordTokenizer([t for r in ROWS for t in (r.question, r.answer)])
    data = QADataset.from_rows(ROWS, tokenizer, max_length=16)
    model = tiny_gpt(len(tokenizer), n_positions=16, n_embd=16, n_layer=1, n_head=2, seed=0)
    return tokenizer, data, model


def test_labels_are_the_answer_and_eos_shifted_by_one():
    tokenizer, data, _ = _setup()
    ids, labels, _ = data[0]
    start = int(data.prompt_lengths[0])
    answer = tokenizer.encode(ROWS[0].answer) + [tokenizer.eos_id]
    assert labels[start - 1:start - 1 + len(answer)].tolist() == answer
    assert (labels[:start - 1] == IGNORE_INDEX).all() and (labels[start - 1 + len(answer):] == IGNORE_INDEX).all()
    assert ids[start:start + len(answer)].tolist() == answer


def test_prompt_positions_do_not_reach_the_loss_and_answer_positions_do():
    _, data, model = _setup()
    batch = Batch(data.input_ids, data.labels, torch.arange(2))
    loss = cross_entropy(model, batch)
    prompt = torch.zeros_like(data.labels, dtype=torch.bool)
    for i, start in enumerate(data.prompt_lengths.tolist()):
        prompt[i, :start - 1] = True  # positions that predict a question token

    def scrambled(where):
        # the model's logits with noise at the chosen positions
        return lambda x: model(x) + 50.0 * torch.randn(*x.shape, 1).expand(-1, -1, model(x).shape[-1]) \
            * torch.randn(1, 1, model(x).shape[-1]) * where.unsqueeze(-1)

    assert torch.isclose(cross_entropy(scrambled(prompt), batch), loss)
    answer = data.labels != IGNORE_INDEX
    assert not torch.isclose(cross_entropy(scrambled(answer), batch), loss)
    # and the prompt really is labelled -100: the loss is the mean over answer positions only
    logits = model(data.input_ids)
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(logits[answer], data.labels[answer]))


def test_wrapper_returns_logits_over_the_vocabulary():
    tokenizer, data, model = _setup()
    assert model(data.input_ids).shape == (2, 16, len(tokenizer))
