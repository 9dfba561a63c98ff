"""Batched generation from left-padded prompts gives what each prompt gives alone."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf.rollout import generate
from rlhf.toy import ToyModelConfig, build_model, build_tokenizer


def gpt2_like(tokenizer):
    # Absolute position embeddings: a prompt shifted right by its padding would read wrong
    # positions unless generation derives them from the attention mask.
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_batch_matches_each_prompt_alone(family):
    tokenizer = build_tokenizer()
    model = build_model(ToyModelConfig(), tokenizer, seed=3).eval() if family == "llama" else gpt2_like(tokenizer)
    # A random model rarely emits EOS early, so every row runs the full length: a strict comparison.
    prompts = [tokenizer(text).input_ids for text in ("1+2=", "a much longer prompt, 45+67=", "9+9=")]
    kwargs = dict(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=8, temperature=0.0)
    batched = generate(model, prompts, **kwargs)
    alone = [generate(model, [p], **kwargs)[0] for p in prompts]
    assert batched == alone
    assert all(len(r) >= 1 for r in batched)


def test_response_is_cut_after_the_first_eos():
    tokenizer = build_tokenizer()
    model = build_model(ToyModelConfig(), tokenizer, seed=3).eval()
    # A large bonus on the EOS logit makes it the certain next token, so the cut is deterministic.
    bonus = torch.zeros(len(tokenizer))
    bonus[tokenizer.eos_token_id] = 1e4
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bonus)
    out = generate(model, [tokenizer("1+2=").input_ids], pad_id=tokenizer.pad_token_id,
                   eos_id=tokenizer.eos_token_id, max_new_tokens=5, temperature=0.0)
    assert out == [[tokenizer.eos_token_id]]
