"""Rollouts: batched generation and scoring of left-padded prompts give what each row gives alone."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf.models import ScalarModel
from rlhf.rollout import build_sequences, generate, policy_logprobs, token_values
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


def _rollout_batch(tokenizer, seed=5):
    """Prompts of different lengths and responses of different lengths (one with EOS)."""
    prompts = [tokenizer(t).input_ids for t in ("1+2=", "a longer prompt 45+67=", "9+9=")]
    eos = tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    responses = [[digits[int(i)] for i in torch.randint(0, 10, (n,), generator=gen)] for n in (3, 1, 5)]
    responses[0].append(eos)
    return prompts, responses


def test_sequences_layout_and_masks():
    tokenizer = build_tokenizer()
    prompts, responses = _rollout_batch(tokenizer)
    seqs = build_sequences(prompts, responses, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    width = max(len(p) for p in prompts)
    assert seqs.prompt_width == width
    assert seqs.response_lengths.tolist() == [len(r) for r in responses]
    assert seqs.has_eos.tolist() == [True, False, False]
    for i, (p, r) in enumerate(zip(prompts, responses)):
        row = seqs.input_ids[i][seqs.attention_mask[i].bool()].tolist()
        assert row == p + r  # the real tokens, in order, are exactly prompt + response
        assert seqs.response_ids[i, : len(r)].tolist() == r
        # Positions count real tokens from 0, whatever the left padding.
        assert seqs.position_ids[i][seqs.attention_mask[i].bool()].tolist() == list(range(len(p) + len(r)))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_policy_logprobs_and_values_match_each_row_scored_alone(temperature):
    """Batched, padded scoring gives each response token the log-prob (at the sampling
    temperature) and the value that the unpadded row gives alone, computed in float64."""
    tokenizer = build_tokenizer()
    prompts, responses = _rollout_batch(tokenizer)
    actor = build_model(ToyModelConfig(), tokenizer, seed=3).eval()
    critic = ScalarModel(build_model(ToyModelConfig(), tokenizer, seed=4, head="scalar").eval())
    seqs = build_sequences(prompts, responses, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    with torch.no_grad():
        logp, entropy = policy_logprobs(actor, seqs, temperature=temperature, with_entropy=True)
        values = token_values(critic, seqs)
        actor64, critic64 = copy.deepcopy(actor).double(), copy.deepcopy(critic).double()
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            logits = actor64(input_ids=ids).logits[0] / temperature  # (T, V)
            scores = critic64(ids, torch.ones_like(ids))[0]
            for t, token in enumerate(r):
                position = len(p) - 1 + t  # the state before response token t
                expected = torch.log_softmax(logits[position], dim=-1)[token]
                assert abs(logp[i, t].item() - expected.item()) < 1e-4
                probs = torch.softmax(logits[position], dim=-1)
                assert abs(entropy[i, t].item() - (-(probs * probs.log()).sum()).item()) < 1e-4
                assert abs(values[i, t].item() - scores[position].item()) < 1e-4
