"""Causal language models for question-answer unlearning, and the tensors they train on.

* :func:`tiny_gpt`: a small GPT-2-style model built from a ``GPT2Config`` (no
  weights downloaded), trained from scratch on the embedded default;
* :func:`load_hf_causal_lm`: ``hf:<local dir>``, a causal LM and its tokenizer
  saved with ``save_pretrained``, loaded offline (``local_files_only``).

Both are wrapped in :class:`CausalLM`, whose ``forward(input_ids)`` returns the
``(batch, tokens, vocab)`` logits, so the engine's losses
(:func:`sharp_unlearn.losses.cross_entropy`) and the training loop use it as
they use an image classifier.

:class:`QADataset` yields ``(input_ids, labels, index)`` with the labels
already shifted (``labels[t]`` is the token after position ``t``) and ``-100``
on every position whose next token is not an answer token: the loss is on the
answer only. Sequences are right-padded; with causal attention the padding
after the answer never reaches the positions that are scored.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from sharp_unlearn.data.qa import QARow
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.losses import IGNORE_INDEX

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
    """Deterministic word-level tokenizer built from a corpus (lower-cased words and punctuation).

    Ids: 0 pad, 1 bos, 2 eos, 3 unk, then the corpus words in sorted order.
    """

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    specials = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, texts: Sequence[str]):
        words = sorted({w for text in texts for w in self.split(text)})
        self.vocab = [*self.specials, *words]
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk_id) for w in self.split(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i >= len(self.specials))

    def __len__(self) -> int:
        return len(self.vocab)


class HFTokenizer:
    """A ``transformers`` tokenizer behind the same interface as :class:`WordTokenizer`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def __len__(self) -> int:
        return len(self.tokenizer)


class CausalLM(nn.Module):
    """A ``transformers`` causal LM whose forward takes token ids and returns the logits tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def tiny_gpt(vocab_size: int, *, n_positions: int = 32, n_embd: int = 64, n_layer: int = 2, n_head: int = 2,
             seed: int = 0) -> CausalLM:
    """A small GPT-2-style model with freshly initialised weights (seeded), no dropout (deterministic);
    exact GELU, not GPT-2's tanh approximation, which costs more than the attention at this size on CPU."""
    # transformers is heavy and optional (the `lm` extra): only language-model runs import it
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=WordTokenizer.bos_id, eos_token_id=WordTokenizer.eos_id)
    torch.manual_seed(seed)
    return CausalLM(GPT2LMHeadModel(config))


def load_hf_causal_lm(name: str) -> tuple[CausalLM, HFTokenizer]:
    """``hf:<local dir>``: model and tokenizer from a directory, offline."""
    if not name.startswith("hf:"):
        raise ConfigError(f"model.name={name!r}; expected tiny_gpt or hf:<local directory>")
    directory = Path(name[3:]).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"model.name={name!r}: {str(directory)!r} is not a directory; expected a local "
                          "directory saved with save_pretrained (models are never downloaded)")
    # heavy optional dependency (the `lm` extra)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return CausalLM(model), HFTokenizer(tokenizer)


def encode_pair(tokenizer, question: str, answer: str, max_length: int) -> tuple[list[int], int]:
    """``bos question answer eos`` token ids (cut to ``max_length``) and where the answer starts."""
    prompt = [tokenizer.bos_id, *tokenizer.encode(question)]
    ids = [*prompt, *tokenizer.encode(answer), tokenizer.eos_id]
    if len(prompt) >= max_length:
        raise ConfigError(f"question {question[:40]!r} is {len(prompt)} tokens; expected fewer than "
                          f"max_length={max_length}")
    return ids[:max_length], len(prompt)


class QADataset(Dataset):
    """``(input_ids, labels, index)`` per row with answer-only labels (build with :meth:`from_rows`)."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, prompt_lengths: torch.Tensor):
        self.input_ids, self.labels, self.prompt_lengths = input_ids, labels, prompt_lengths

    @classmethod
    def from_rows(cls, rows: Sequence[QARow], tokenizer, max_length: int = 32,
                  answer_texts: Sequence[str] | None = None) -> QADataset:
        """Rows' questions with their answers, or with ``answer_texts`` (a paraphrase, a perturbed answer)."""
        texts = answer_texts if answer_texts is not None else [r.answer for r in rows]
        input_ids = torch.full((len(rows), max_length), tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), max_length), IGNORE_INDEX, dtype=torch.long)
        prompt_lengths = torch.zeros(len(rows), dtype=torch.long)
        for i, (row, text) in enumerate(zip(rows, texts)):
            ids, start = encode_pair(tokenizer, row.question, text, max_length)
            input_ids[i, :len(ids)] = torch.tensor(ids)
            # position t predicts token t+1: score the positions whose next token is in the answer (or eos)
            labels[i, start - 1:len(ids) - 1] = torch.tensor(ids[start:])
            prompt_lengths[i] = start
        return cls(input_ids, labels, prompt_lengths)

    @classmethod
    def concat(cls, parts: Sequence[QADataset]) -> QADataset:
        return cls(torch.cat([p.input_ids for p in parts]), torch.cat([p.labels for p in parts]),
                   torch.cat([p.prompt_lengths for p in parts]))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int):
        return self.input_ids[i], self.labels[i], i
