"""The architectures users bring, as tiny random models built from transformers' config classes (no
download): what the toy Llama cannot show, each checked the way PPO uses the model.

Per architecture: greedy generation of a left-padded batch equals each prompt alone (absolute
positions, sliding windows, soft-capping), rollout log-probs equal a plain float64 forward on the
unpadded row, the reward read at the last real token equals transformers' own sequence
classification pooling, the log-prob ratio is exactly 1 before any update with dropout configured
on, and the scalar model's folder reloads with transformers alone."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from rlhf.models.loading import ScalarModel, disable_dropout
from rlhf.rollouts.generation import Sampling, generate, policy_logprobs, sequence_scores
from rlhf.toy import build_tokenizer
from tests.sequences import build_sequences

# scripts/gpu-check.sh runs this file on a GPU (RLHF_TEST_DEVICE=cuda), in fp32 with TF32 off so
# that the CPU's tolerances hold there too.
DEVICE = torch.device(os.environ.get("RLHF_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128)

# Dropout is configured on wherever the architecture has it: PPO must turn it off.
ARCHITECTURES = {
    "gpt2": lambda v: GPT2Config(vocab_size=v, n_positions=128, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.2,
                                 embd_pdrop=0.2, attn_pdrop=0.2),
    "opt": lambda v: OPTConfig(vocab_size=v, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                               word_embed_proj_dim=32, max_position_embeddings=128, dropout=0.2, attention_dropout=0.2,
                               activation_dropout=0.2),
    "llama": lambda v: LlamaConfig(vocab_size=v, attention_dropout=0.2, **SMALL),
    "mistral": lambda v: MistralConfig(vocab_size=v, sliding_window=8, attention_dropout=0.2, **SMALL),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, attention_dropout=0.2, **SMALL),
    "qwen3": lambda v: Qwen3Config(vocab_size=v, head_dim=8, attention_dropout=0.2, **SMALL),
    "gemma2": lambda v: Gemma2Config(vocab_size=v, head_dim=8, sliding_window=8, attention_dropout=0.2, **SMALL),
    "phi3": lambda v: Phi3Config(vocab_size=v, resid_pdrop=0.2, embd_pdrop=0.2, attention_dropout=0.2,
                                 pad_token_id=0, **{k: v2 for k, v2 in SMALL.items()}),
    "gpt_neox": lambda v: GPTNeoXConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=128, attention_dropout=0.2,
                                        hidden_dropout=0.2),
}


def config_for(arch: str, tokenizer):
    config = ARCHITECTURES[arch](len(tokenizer))
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    config.num_labels = 1
    return config


def causal_lm(arch: str, tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(arch, tokenizer), attn_implementation="eager")
    disable_dropout(model)
    return model.to(DEVICE).eval()


def scalar_model(arch: str, tokenizer, seed: int = 1):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config_for(arch, tokenizer), attn_implementation="eager")
    disable_dropout(model)
    return model.to(DEVICE).eval()


def batch(tokenizer):
    """Prompts of different lengths (left padding differs per row) and responses of different lengths."""
    prompts = [tokenizer(t).input_ids for t in ("1+2=", "a much longer prompt here, 45+67=", "9+9=")]
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    responses = [[digits[3], digits[1], tokenizer.eos_token_id], [digits[7]], [digits[2], digits[9], digits[4], digits[4]]]
    return prompts, responses


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_generation_of_a_left_padded_batch_equals_each_prompt_alone(arch):
    tokenizer = build_tokenizer()
    model = causal_lm(arch, tokenizer)
    prompts, _ = batch(tokenizer)
    greedy = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=6, temperature=0.0, device=DEVICE)
    with torch.no_grad():
        assert generate(model, prompts, greedy) == [generate(model, [p], greedy)[0] for p in prompts]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rollout_logprobs_equal_a_plain_forward_on_the_unpadded_row(arch):
    tokenizer = build_tokenizer()
    model = causal_lm(arch, tokenizer)
    prompts, responses = batch(tokenizer)
    seqs = build_sequences(prompts, responses, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, device=DEVICE)
    with torch.no_grad():
        logp, _ = policy_logprobs(model, seqs, temperature=0.7)
        plain = copy.deepcopy(model).double()
        for i, (p, r) in enumerate(zip(prompts, responses)):
            logits = plain(input_ids=torch.tensor([p + r], device=DEVICE)).logits[0] / 0.7
            expected = [torch.log_softmax(logits[len(p) - 1 + t], dim=-1)[token].item() for t, token in enumerate(r)]
            assert logp[i, : len(r)].tolist() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_reward_is_transformers_own_sequence_classification_score(arch):
    """Read at the last real token (the EOS when there is one), left padding or none."""
    tokenizer = build_tokenizer()
    model = scalar_model(arch, tokenizer)
    prompts, responses = batch(tokenizer)
    seqs = build_sequences(prompts, responses, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, device=DEVICE)
    with torch.no_grad():
        ours = sequence_scores(ScalarModel(model), seqs)
        alone = [model(input_ids=torch.tensor([p + r], device=DEVICE)).logits[0, 0].item() for p, r in zip(prompts, responses)]
    assert ours.tolist() == pytest.approx(alone, abs=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_ratio_is_one_before_any_update_in_train_mode(arch):
    """PPO's first minibatch compares the actor with the rollout's own log-probs: with dropout
    configured on and train mode, they must agree exactly (ratio 1, approx_kl 0)."""
    tokenizer = build_tokenizer()
    model = causal_lm(arch, tokenizer).train()
    prompts, responses = batch(tokenizer)
    seqs = build_sequences(prompts, responses, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, device=DEVICE)
    first, _ = policy_logprobs(model, seqs, temperature=1.0)
    second, _ = policy_logprobs(model, seqs, temperature=1.0)
    assert torch.equal(first, second)
