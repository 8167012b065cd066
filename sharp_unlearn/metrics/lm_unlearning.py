"""Language-model unlearning metrics, named as the field names them (TOFU, MUSE, ToW).

* ``answer_loss`` / ``token_acc``: mean cross-entropy and greedy next-token accuracy on the
  answer tokens (teacher forcing), per split;
* ``rouge_l``: ROUGE-L recall of the greedy answer against the true one (longest common
  subsequence of words over the true answer's length);
* ``truth_ratio`` per question: the perturbed (wrong) answers' mean length-normalised
  probability over the paraphrased answer's, ``R = mean_j P(a_j|q)^(1/|a_j|) / P(a~|q)^(1/|a~|)``;
* ``forget_quality``: the KS-test p-value between the unlearned and the retrained models'
  truth-ratio distributions on the forget set (1: indistinguishable, small: still remembered);
* ``model_utility``: the harmonic mean, over the retain and world sets, of answer probability,
  ROUGE-L and truth score ``max(0, 1 - R)``;
* ``mia_auc_loss`` / ``mia_auc_zlib`` / ``mia_auc_mink``: membership-inference AUC, forget
  (members) against held-out subjects (never trained on), with the answer loss, the loss over
  the zlib-compressed length of the answer, and the Min-K% token probability (0.5: no signal);
* ``tow``: ToW against the retrained reference over forget / retain / held-out token accuracy
  (:func:`sharp_unlearn.metrics.tow.tow`), with the signed ``forget_gap`` beside it.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sharp_unlearn.data.qa import QARow
from sharp_unlearn.losses import IGNORE_INDEX, sequence_log_likelihood
from sharp_unlearn.metrics.mia import roc_attack
from sharp_unlearn.metrics.tow import forget_gap, tow
from sharp_unlearn.models.causal_lm import QADataset, encode_pair

MIN_K_FRACTION = 0.2


@dataclass
class ExampleScores:
    """Per example: summed answer log-probability, answer length, greedy-correct tokens, Min-K% log-prob."""

    logp: np.ndarray
    tokens: np.ndarray
    correct: np.ndarray
    min_k: np.ndarray

    @property
    def mean_nll(self) -> np.ndarray:
        return -self.logp / np.maximum(self.tokens, 1)


@torch.no_grad()
def example_scores(model: nn.Module, data: QADataset, batch_size: int = 128,
                   device: torch.device | str = "cpu") -> ExampleScores:
    model.eval()
    logp, tokens, correct, min_k = [], [], [], []
    for start in range(0, len(data), batch_size):
        x = data.input_ids[start:start + batch_size].to(device)
        y = data.labels[start:start + batch_size].to(device)
        logits = model(x).float()
        total, count = sequence_log_likelihood(logits, y)
        scored = y != IGNORE_INDEX
        correct.append(((logits.argmax(-1) == y) & scored).sum(-1).cpu())
        token_logp = torch.log_softmax(logits, -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        for row_logp, row_scored in zip(token_logp, scored):
            values = row_logp[row_scored]
            k = max(1, int(MIN_K_FRACTION * len(values)))
            min_k.append(float(values.sort().values[:k].mean()))
        logp.append(total.cpu())
        tokens.append(count.cpu())
    return ExampleScores(torch.cat(logp).double().numpy(), torch.cat(tokens).numpy(),
                         torch.cat(correct).numpy(), np.asarray(min_k))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (dynamic programming, one row kept)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_recall(reference: Sequence, generated: Sequence) -> float:
    """ROUGE-L recall: LCS over the reference's length (1.0 for an empty reference)."""
    return lcs_length(reference, generated) / len(reference) if reference else 1.0


@torch.no_grad()
def greedy_answers(model: nn.Module, rows: Sequence[QARow], tokenizer, max_length: int,
                   max_new_tokens: int = 16, device: torch.device | str = "cpu") -> list[list[int]]:
    """Greedy continuations of each question (token ids, up to eos), prompts of one length batched together."""
    model.eval()
    prompts = [encode_pair(tokenizer, row.question, "", max_length)[0][:-1] for row in rows]  # drop the eos
    answers: list[list[int]] = [[] for _ in rows]
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    for length, members in by_length.items():
        ids = torch.tensor([prompts[i] for i in members], device=device)
        done = torch.zeros(len(members), dtype=torch.bool, device=device)
        for _ in range(min(max_new_tokens, max_length - length)):
            next_ids = model(ids)[:, -1].argmax(-1)
            for position, i in enumerate(members):
                if not done[position]:
                    if int(next_ids[position]) == tokenizer.eos_id:
                        done[position] = True
                    else:
                        answers[i].append(int(next_ids[position]))
            if bool(done.all()):
                break
            ids = torch.cat([ids, next_ids.unsqueeze(1)], 1)
    return answers


def rouge_l(model: nn.Module, rows: Sequence[QARow], tokenizer, max_length: int,
            device: torch.device | str = "cpu") -> np.ndarray:
    # one token past the longest answer is enough to see where each greedy answer ends
    longest = max(len(tokenizer.encode(row.answer)) for row in rows) + 1
    generated = greedy_answers(model, rows, tokenizer, max_length, max_new_tokens=longest, device=device)
    return np.asarray([rouge_l_recall(tokenizer.encode(row.answer), gen) for row, gen in zip(rows, generated)])


def truth_ratios(model: nn.Module, rows: Sequence[QARow], tokenizer, max_length: int,
                 device: torch.device | str = "cpu") -> np.ndarray:
    """Per row with a paraphrase and wrong answers: perturbed over paraphrased length-normalised probability."""
    rows = [r for r in rows if r.paraphrased_answer and r.perturbed_answers]
    if not rows:
        return np.zeros(0)

    def normalised_logp(texts: Sequence[str], which: Sequence[QARow]) -> np.ndarray:
        scores = example_scores(model, QADataset.from_rows(which, tokenizer, max_length, texts), device=device)
        return scores.logp / np.maximum(scores.tokens, 1)

    paraphrased = normalised_logp([r.paraphrased_answer for r in rows], rows)
    n_wrong = min(len(r.perturbed_answers) for r in rows)
    perturbed = np.stack([normalised_logp([r.perturbed_answers[j] for r in rows], rows) for j in range(n_wrong)])
    return np.exp(perturbed).mean(0) / np.exp(paraphrased)


def forget_quality(unlearned_ratios: np.ndarray, reference_ratios: np.ndarray) -> float:
    """KS-test p-value between two truth-ratio samples (1: same distribution)."""
    from scipy.stats import ks_2samp  # heavy optional dependency: only LM evaluation needs it

    return float(ks_2samp(unlearned_ratios, reference_ratios).pvalue)


def harmonic_mean(values: Sequence[float]) -> float:
    values = [max(float(v), 0.0) for v in values]
    return 0.0 if any(v == 0.0 for v in values) else len(values) / sum(1.0 / v for v in values)


def zlib_length(text: str) -> int:
    return len(zlib.compress(text.encode("utf-8")))


def mia_aucs(forget: ExampleScores, heldout: ExampleScores, forget_rows: Sequence[QARow],
             heldout_rows: Sequence[QARow]) -> dict[str, float]:
    """AUC of "higher score = member" for forget (members) against held-out (non-members)."""
    def zlib_score(scores: ExampleScores, rows: Sequence[QARow]) -> np.ndarray:
        return scores.logp / np.asarray([zlib_length(r.answer) for r in rows])

    return {"mia_auc_loss": roc_attack(-forget.mean_nll, -heldout.mean_nll)[0],
            "mia_auc_zlib": roc_attack(zlib_score(forget, forget_rows), zlib_score(heldout, heldout_rows))[0],
            "mia_auc_mink": roc_attack(forget.min_k, heldout.min_k)[0]}


def evaluate_lm(model: nn.Module, tokenizer, splits: dict[str, Sequence[QARow]], max_length: int,
                device: torch.device | str = "cpu") -> tuple[dict[str, float], np.ndarray]:
    """Every per-model metric of one model on ``splits`` (forget, retain, heldout, world), and its
    truth ratios on the forget set (for forget quality against the reference)."""
    metrics: dict[str, float] = {}
    scores = {}
    utility = []
    for name, rows in splits.items():
        scores[name] = example_scores(model, QADataset.from_rows(rows, tokenizer, max_length), device=device)
        tokens = scores[name].tokens.sum()
        metrics[f"{name}_answer_loss"] = float(-scores[name].logp.sum() / tokens)
        metrics[f"{name}_token_acc"] = float(scores[name].correct.sum() / tokens)
        metrics[f"{name}_rouge_l"] = float(rouge_l(model, rows, tokenizer, max_length, device).mean())
        if name in ("retain", "world"):
            probability = float(np.exp(-scores[name].mean_nll).mean())
            truth = truth_ratios(model, rows, tokenizer, max_length, device)
            utility += [probability, metrics[f"{name}_rouge_l"], float(np.maximum(0.0, 1.0 - truth).mean())]
    metrics["model_utility"] = harmonic_mean(utility)
    metrics.update(mia_aucs(scores["forget"], scores["heldout"], splits["forget"], splits["heldout"]))
    forget_ratios = truth_ratios(model, splits["forget"], tokenizer, max_length, device)
    metrics["forget_truth_ratio"] = float(forget_ratios.mean())
    return metrics, forget_ratios


def against_reference(metrics: dict[str, float], forget_ratios: np.ndarray, reference: dict[str, float],
                      reference_ratios: np.ndarray) -> dict[str, float]:
    """The metrics that compare a model with the retrained reference: forget quality, ToW, forget gap."""
    def accuracies(m: dict[str, float]) -> dict[str, float]:
        return {"retain_acc": 100 * m["retain_token_acc"], "forget_acc": 100 * m["forget_token_acc"],
                "test_acc": 100 * m["heldout_token_acc"]}

    return {"forget_quality": forget_quality(forget_ratios, reference_ratios),
            "tow": tow(accuracies(metrics), accuracies(reference)),
            "forget_gap": forget_gap(accuracies(metrics), accuracies(reference))}
