"""`model_name=hf:<local dir>`: a causal LM and its tokenizer saved with save_pretrained load offline and
train through the same loss (answer tokens only)."""
from __future__ import annotations

import pytest
import torch

from sharp_unlearn.data.qa import QARow
from sharp_unlearn.engine.objective import Batch
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.losses import IGNORE_INDEX, cross_entropy
from sharp_unlearn.models.causal_lm import QADataset, load_hf_causal_lm

ROWS = [QARow("where was ana born ?", "ana was born in rome", "ana")]


@pytest.fixture
def saved_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "where", "was", "ana", "born", "?", "in", "rome"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                       eos_token_id=1, bos_token_id=1))
    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    return tmp_path


def test_hf_dir_loads_offline_and_scores_only_the_answer(saved_model):
    model, tokenizer = load_hf_causal_lm(f"hf:{saved_model}")
    data = QADataset.from_rows(ROWS, tokenizer, max_length=16)
    answer = tokenizer.encode(ROWS[0].answer) + [tokenizer.eos_id]
    assert answer[:5] == [5, 4, 6, 8, 9]  # the model's own tokenizer: ana was born in rome
    assert (data.labels != IGNORE_INDEX).sum() == len(answer)
    loss = cross_entropy(model, Batch(data.input_ids, data.labels, torch.arange(1)))
    assert torch.isfinite(loss) and loss.requires_grad


def test_hf_name_that_is_not_a_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        load_hf_causal_lm(f"hf:{tmp_path / 'missing'}")
