"""ppo.estimator and its companion settings: the paper defaults null stands for, and the
combinations refused with one line naming the key."""

from __future__ import annotations

import pytest

from rlhf.config import PPOConfig, kl_estimator_of, load_config, loss_aggregation_of
from rlhf.errors import UserError


def test_defaults_are_todays_ppo():
    ppo = load_config(PPOConfig).ppo
    assert (ppo.estimator, ppo.kl_in, kl_estimator_of(ppo), loss_aggregation_of(ppo)) == ("gae", "reward", "k1", "token_mean")
    assert load_config(PPOConfig).rollout.samples_per_prompt == 1


@pytest.mark.parametrize("overrides, kl, aggregation", [
    (["ppo.estimator=grpo", "rollout.samples_per_prompt=4"], "k1", "sequence_mean"),
    (["ppo.estimator=grpo", "rollout.samples_per_prompt=4", "ppo.kl_in=loss"], "k3", "sequence_mean"),
    (["ppo.estimator=grpo", "rollout.samples_per_prompt=4", "ppo.scale_by_group_std=false", "ppo.loss_aggregation=token_sum"],
     "k1", "token_sum"),
    (["ppo.estimator=rloo", "rollout.samples_per_prompt=2"], "k1", "token_mean"),
    (["ppo.estimator=reinforce_pp", "ppo.kl_in=loss", "ppo.kl_estimator=k2"], "k2", "token_mean"),
])
def test_null_means_the_estimators_paper_default(overrides, kl, aggregation):
    ppo = load_config(PPOConfig, None, overrides).ppo
    assert (kl_estimator_of(ppo), loss_aggregation_of(ppo)) == (kl, aggregation)


@pytest.mark.parametrize("overrides, fragments", [
    (["ppo.estimator=grpo"], ["ppo.estimator=grpo", "rollout.samples_per_prompt", "got 1"]),
    (["ppo.estimator=rloo", "rollout.samples_per_prompt=1"], ["ppo.estimator=rloo", "rollout.samples_per_prompt"]),
    (["ppo.estimator=grpo", "rollout.samples_per_prompt=3"], ["rollout.batch_size (64)", "rollout.samples_per_prompt (3)"]),
    (["rollout.samples_per_prompt=0"], ["rollout.samples_per_prompt must be at least 1"]),
    (["ppo.estimator=rloo", "rollout.samples_per_prompt=4", "ppo.scale_by_group_std=false"], ["ppo.scale_by_group_std", "grpo"]),
    (["ppo.estimator=grpo", "rollout.samples_per_prompt=4", "ppo.whiten_rewards=true"], ["ppo.whiten_rewards", "grpo"]),
    (["ppo.kl_in=loss", "ppo.kl_estimator=k1"], ["ppo.kl_in=loss", "k3"]),
    (["ppo.estimator=ppo"], ["ppo.estimator"]),
])
def test_estimator_settings_that_cannot_work(overrides, fragments):
    with pytest.raises(UserError) as err:
        load_config(PPOConfig, None, overrides)
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in fragments), message
