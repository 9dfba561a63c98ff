"""PPO compares log-probs of the same weights: with dropout off, two forward passes agree exactly, in
train mode too, whatever way an architecture applies its dropout."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPTNeoXConfig,
    OPTConfig,
    PhiConfig,
)

from rlhf.models.loading import disable_dropout

# Each applies dropout its own way: OPT calls nn.functional.dropout with a float `dropout`
# attribute (and has layerdrop), GPT-2 has nn.Dropout modules named *_pdrop in its config,
# GPT-NeoX has attention and hidden dropout, Phi resid and embedding dropout.
CONFIGS = {
    "opt": lambda: OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                             word_embed_proj_dim=32, max_position_embeddings=64, dropout=0.3, attention_dropout=0.3,
                             activation_dropout=0.3),
    "gpt2": lambda: GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.3,
                               embd_pdrop=0.3, attn_pdrop=0.3),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, attention_dropout=0.3,
                                      hidden_dropout=0.3),
    "phi": lambda: PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=64, resid_pdrop=0.3, embd_pdrop=0.3,
                             attention_dropout=0.3),
}


@pytest.mark.parametrize("family", CONFIGS)
@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_two_forward_passes_agree_in_train_mode(family, head):
    torch.manual_seed(0)
    config = CONFIGS[family]()
    config.pad_token_id, config.num_labels = 0, 1
    model = (AutoModelForCausalLM if head == "lm" else AutoModelForSequenceClassification).from_config(config)
    model.train()
    ids = torch.randint(1, 64, (3, 12))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # the dropout is real before
    disable_dropout(model)
    model.train()  # the critic and the actor train in train mode
    assert torch.equal(model(ids).logits, model(ids).logits)
