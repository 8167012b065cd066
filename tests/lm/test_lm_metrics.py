"""LM unlearning metrics: ROUGE-L, NPO's loss, and forget quality on really trained tiny models."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from sharp_unlearn.methods.npo import npo_loss
from sharp_unlearn.metrics.lm_unlearning import (
    evaluate_lm,
    forget_quality,
    harmonic_mean,
    lcs_length,
    rouge_l_recall,
)
from sharp_unlearn.recipes.lm import LMDemoSettings, build_setup, optimizer_config, train_lm


def test_rouge_l_recall_is_lcs_over_reference_length():
    assert lcs_length("abcbdab", "bdcaba") == 4
    assert rouge_l_recall([1, 2, 3, 4], [1, 9, 3, 4, 7]) == 0.75
    assert rouge_l_recall([1, 2], []) == 0.0 and rouge_l_recall([5, 6], [5, 6]) == 1.0


def test_harmonic_mean_is_zero_when_any_score_is_zero():
    assert harmonic_mean([0.5, 0.5]) == pytest.approx(0.5)
    assert harmonic_mean([1.0, 0.25]) == pytest.approx(0.4)
    assert harmonic_mean([0.9, 0.0]) == 0.0


def test_npo_loss_is_2log2_over_beta_at_the_reference_and_falls_as_the_answer_is_forgotten():
    logp = torch.tensor([-3.0, -5.0])
    assert float(npo_loss(logp, logp, 0.5)) == pytest.approx(4 * math.log(2))
    assert float(npo_loss(logp - 10, logp, 0.5)) < float(npo_loss(logp, logp, 0.5))


@pytest.fixture(scope="module")
def trained():
    """A tiny GPT memorising 16 fictitious people (4 forgotten) and one trained without the forgotten four."""
    torch.manual_seed(0)
    settings = LMDemoSettings(subjects=16, forget_size=0.25, heldout_fraction=0.0, n_embd=32, n_layer=1,
                              pretrain_epochs=40, batch_size=32)
    setup = build_setup(settings)
    adamw = optimizer_config("adamw", settings.pretrain_lr, settings.rho)
    pretrained = train_lm(copy.deepcopy(setup.initial), setup.train, epochs=settings.pretrain_epochs,
                          optimizer=adamw, batch_size=settings.batch_size, seed=0)
    retrained = train_lm(copy.deepcopy(setup.initial), setup.retain, epochs=settings.pretrain_epochs,
                         optimizer=adamw, batch_size=settings.batch_size, seed=0)
    splits = {**setup.eval_splits, "heldout": setup.split.retain[:20]}  # no held-out subjects at this size
    return setup, settings, pretrained, retrained, splits


def test_forget_quality_is_one_for_the_reference_and_small_for_the_model_that_remembers(trained):
    setup, settings, pretrained, retrained, splits = trained
    reference, reference_ratios = evaluate_lm(retrained, setup.tokenizer, splits, settings.max_length)
    remembered, remembered_ratios = evaluate_lm(pretrained, setup.tokenizer, splits, settings.max_length)
    assert forget_quality(reference_ratios, reference_ratios) == pytest.approx(1.0)
    assert forget_quality(remembered_ratios, reference_ratios) < 0.01
    # the pretrained model answers the forgotten people's questions; the reference does not
    assert remembered["forget_rouge_l"] > 0.9 > reference["forget_rouge_l"] + 0.2
    assert remembered["forget_token_acc"] > reference["forget_token_acc"]
    assert 0.0 < reference["model_utility"] <= 1.0 and np.isfinite(remembered["mia_auc_loss"])
