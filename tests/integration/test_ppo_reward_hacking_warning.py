"""The warning before `rlhf ppo` launches with ppo.beta=0 against a learned reward model (rlhf/launcher/reward_hacking.py):
one yellow line on stderr, and the run still launches; nothing said with a KL penalty or a reward function. Dry runs of
real toy entries (built, not trained)."""

from __future__ import annotations

from rlhf.config import PPOConfig
from rlhf.config.common import RewardConfig
from rlhf.config.ppo_sections import PPOAlgoConfig
from rlhf.launcher.reward_hacking import unanchored_policy_warning
from tests.integration.conftest import rlhf_here
from tests.integration.test_ppo_errors import sft_and_rm


def test_beta_zero_against_a_reward_model_is_warned_and_still_launches(tmp_path):
    _, rm = sft_and_rm(tmp_path)
    result = rlhf_here("ppo", "--dry-run", "ppo.beta=0", f"reward.name_or_path=rm:{rm.id}", home=tmp_path)
    assert result.code == 0, result.output[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("warning: ppo.beta=0")]
    assert f"the learned reward model rm:{rm.id}" in line and "set ppo.beta (0.2 is the default)" in line
    assert "--module rlhf.stages.ppo" in result.stdout  # launched all the same
    anchored = rlhf_here("ppo", "--dry-run", f"reward.name_or_path=rm:{rm.id}", home=tmp_path)
    assert anchored.code == 0 and "ppo.beta=0" not in anchored.stderr


def test_only_a_learned_reward_with_no_penalty_is_warned():
    def config(beta: float, *sources: str) -> PPOConfig:
        return PPOConfig(ppo=PPOAlgoConfig(beta=beta), reward=RewardConfig(name_or_path=list(sources)))

    assert unanchored_policy_warning(config(0.0, "python:rlhf.tasks.chat:exact_reward")) is None  # RLVR's usual recipe
    assert unanchored_policy_warning(config(0.0, "oracle")) is None
    assert unanchored_policy_warning(config(0.05, "rm:latest", "python:rlhf.tasks.chat:exact_reward")) is None
    mixed = unanchored_policy_warning(config(0.0, "python:rlhf.tasks.chat:exact_reward", "rm:latest"))
    assert mixed is not None and "the learned reward model rm:latest:" in mixed
