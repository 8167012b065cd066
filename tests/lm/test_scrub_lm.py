"""SCRUB on a causal LM: token-level distillation over the answer tokens only, and a max step forgets."""
from __future__ import annotations

import copy

import pytest
import torch

from sharp_unlearn.config import MethodConfig, OptimizerConfig
from sharp_unlearn.data.qa import QARow
from sharp_unlearn.engine.loop import Trainer
from sharp_unlearn.engine.objective import Batch
from sharp_unlearn.losses import IGNORE_INDEX, cross_entropy, sequence_log_likelihood
from sharp_unlearn.methods import METHODS, UnlearnContext
from sharp_unlearn.methods.scrub import distill_kl
from sharp_unlearn.models.causal_lm import QADataset, WordTokenizer, tiny_gpt

ROWS = [QARow("where was ana born ?", "ana was born in rome", "ana"),
        QARow("what does bo do ?", "bo works as a baker", "bo"),
        QARow("where does cy live ?", "cy lives in oslo", "cy")]


def _setup():
    tokenizer = WordTokenizer([t for r in ROWS for t in (r.question, r.answer)])
    data = QADataset.from_rows(ROWS, tokenizer, max_length=16)
    model = tiny_gpt(len(tokenizer), n_positions=16, n_embd=16, n_layer=1, n_head=2, seed=0)
    return tokenizer, data, model


def test_kl_is_zero_for_identical_models_and_positive_otherwise():
    _, data, model = _setup()
    with torch.no_grad():
        logits = model(data.input_ids)
        other = copy.deepcopy(model)
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
        assert float(distill_kl(logits, model(data.input_ids), 2.0, data.labels)) == pytest.approx(0.0, abs=1e-6)
        assert float(distill_kl(logits, other(data.input_ids), 2.0, data.labels)) > 1e-4


def test_kl_ignores_prompt_positions_and_averages_over_answer_tokens():
    _, data, model = _setup()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        student = model(data.input_ids)
        teacher = student + torch.randn(student.shape, generator=gen)
    kl = distill_kl(student, teacher, 2.0, data.labels)
    scored = data.labels != IGNORE_INDEX
    changed = student.clone()
    changed[~scored] += 30.0 * torch.randn(changed[~scored].shape, generator=gen)  # prompt and padding only
    torch.testing.assert_close(distill_kl(changed, teacher, 2.0, data.labels), kl)
    changed = student.clone()
    changed[scored] += torch.randn(changed[scored].shape, generator=gen)
    assert not torch.isclose(distill_kl(changed, teacher, 2.0, data.labels), kl)
    # the mean over answer tokens of T^2 * KL(p_t || p_s), by hand
    p_t = torch.softmax(teacher[scored] / 2.0, -1)
    by_hand = 4.0 * (p_t * (p_t.log() - torch.log_softmax(student[scored] / 2.0, -1))).sum(-1).mean()
    torch.testing.assert_close(kl, by_hand)


def test_sequence_logits_without_labels_are_refused():
    with pytest.raises(ValueError, match="labels"):
        distill_kl(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), 1.0)


def test_one_scrub_max_step_lowers_the_forget_answer_likelihood():
    tokenizer, data, model = _setup()
    everything = Batch(data.input_ids, data.labels, torch.arange(3))
    memorise = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):  # the teacher (a copy made in prepare) knows the answers
        memorise.zero_grad()
        cross_entropy(model, everything).backward()
        memorise.step()
    forget = QADataset(data.input_ids[:1], data.labels[:1], data.prompt_lengths[:1])
    retain = QADataset(data.input_ids[1:], data.labels[1:], data.prompt_lengths[1:])
    method = METHODS.get("scrub")(MethodConfig(name="scrub", epochs=1, temperature=1.0),
                                  OptimizerConfig(name="sgd", lr=0.5, weight_decay=0.0), None)
    method.prepare(UnlearnContext(model, retain, forget, len(tokenizer), torch.device("cpu"), 0, batch_size=4))
    # at the teacher's weights the divergence and its gradient are zero; SCRUB's max steps act once the
    # min steps have moved the student: stand in for them with a small move
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen))
    batch = Batch(forget.input_ids, forget.labels, torch.arange(1))

    def forget_logp() -> float:
        with torch.no_grad():
            return float(sequence_log_likelihood(model(batch.x), batch.y)[0].sum())

    before = forget_logp()
    max_phase = method.phases(0)[0]
    assert max_phase.name == "max"
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5)).step(max_phase.objectives, {"forget": [batch]})
    assert forget_logp() < before - 1e-3, (before, forget_logp())
