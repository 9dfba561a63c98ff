"""`rlhf ppo` on bad input: one line naming what and where, exit code 2, no traceback, no run.

The entries are real toy model folders, built but not trained: every check here runs before any
rank starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.models.sources import REWARD_STATS_FILE
from tests.integration.conftest import rlhf_here
from tests.integration.test_rm_errors import other_tokenizer, publish
from tests.integration.test_sft_errors import assert_user_error, write_jsonl


def sft_and_rm(home: Path):
    """An SFT entry and a reward-model entry (with its reward statistics) to run PPO from."""
    sft = publish(home, "sft", head="lm")
    rm = publish(home, "rm", head="scalar")
    (Path(rm.path) / REWARD_STATS_FILE).write_text(json.dumps({"mean": 0.5, "std": 2.0}))
    return sft, rm


def ppo_runs(home: Path) -> list[Path]:
    return list((home / "runs").glob("ppo-*")) if (home / "runs").exists() else []


def test_critic_that_is_not_a_reward_model(home):
    sft, _ = sft_and_rm(home)
    assert_user_error(rlhf_here("ppo", "critic.name_or_path=sft:latest", home=home),
                      "critic.name_or_path", f"sft entry {sft.id}", "LlamaForCausalLM", "not a reward model")
    assert not ppo_runs(home)


def test_actor_and_reward_model_with_different_tokenizers(home):
    _, critic = sft_and_rm(home)
    other = other_tokenizer()
    reward = publish(home, "rm", head="scalar", tokenizer=other, recorded_tokenizer=other)
    assert_user_error(rlhf_here("ppo", f"critic.name_or_path=rm:{critic.id}", f"reward.name_or_path=rm:{reward.id}", home=home),
                      "reward.name_or_path", reward.id, "another tokenizer than the actor", "vocab_size 101 vs 100")
    assert not ppo_runs(home)


def test_prompt_set_with_no_prompt_that_fits(home):
    sft_and_rm(home)
    prompts = write_jsonl(home / "prompts.jsonl", [{"prompt": "please add these two numbers: 12+34="}] * 3)
    assert_user_error(rlhf_here("ppo", f"data.train={prompts}", "data.max_prompt_length=8", home=home),
                      "all 3 prompts are longer than data.max_prompt_length", "raise data.max_prompt_length")
    # With long_prompts=error the first long prompt is named by file and line.
    assert_user_error(rlhf_here("ppo", f"data.train={prompts}", "data.max_prompt_length=8", "data.long_prompts=error", home=home),
                      "prompts.jsonl:1", "longer than data.max_prompt_length=8")
    assert not ppo_runs(home)


def test_reward_model_without_statistics_to_normalize_with(home):
    _, rm = sft_and_rm(home)
    (Path(rm.path) / REWARD_STATS_FILE).unlink()
    assert_user_error(rlhf_here("ppo", home=home), "reward.name_or_path", REWARD_STATS_FILE, "ppo.normalize_score=false")
