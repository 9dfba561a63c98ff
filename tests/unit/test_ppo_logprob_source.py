"""Where PPO's old log-probs come from: generation's logits only where they equal the actor's forward."""

from __future__ import annotations

import pytest

from rlhf.config import PPOConfig, load_config
from rlhf.stages.ppo_rollout import GENERATION_LOGITS_BUDGET, logprobs_from_generation


def config(*overrides: str) -> PPOConfig:
    return load_config(PPOConfig, None, list(overrides))


def test_fp32_sampling_within_the_budget_uses_generation():
    assert logprobs_from_generation(config(), vocab_size=100)


@pytest.mark.parametrize("override", ["engine.precision=bf16", "rollout.logprobs_from_generation=false"])
def test_otherwise_the_actor_forward(override):
    assert not logprobs_from_generation(config(override), vocab_size=100)


def test_a_large_vocabulary_falls_back_to_the_forward():
    cfg = config("rollout.batch_size=64", "rollout.max_new_tokens=256")
    under = GENERATION_LOGITS_BUDGET // (64 * 256 * 4)
    assert logprobs_from_generation(cfg, vocab_size=under)
    assert not logprobs_from_generation(cfg, vocab_size=under + 1)
    assert not logprobs_from_generation(cfg, vocab_size=49152)  # SmolLM2's: 3.2 GB of logits
