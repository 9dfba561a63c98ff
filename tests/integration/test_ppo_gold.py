"""`rlhf ppo eval.gold=...` through the CLI: a grader of held-out answers gives the gold score and the reward's
agreement with it on the policy's own samples. With the embedded default's oracle wrapped as a python: function,
it must reproduce the agreement the built-in oracle path measures on the same samples."""

from __future__ import annotations

import pytest

from tests.integration.conftest import ONE_PROCESS, PPO_QUICK, assert_ok, entries, home_with_entries_of, metric_rows, rlhf

pytestmark = pytest.mark.slow

# The default SFT policy (right about 60% of the time: samples the oracle orders) rewarded by a function: no RM needed.
SHORT = ("-c", PPO_QUICK, "reward.name_or_path=[python:rlhf.rollouts.rewards:oracle_rewards]",
         "ppo.estimator=grpo", "rollout.samples_per_prompt=4", "train.max_steps=2", "train.eval_every=1",
         "eval.max_rows=32", "eval.batch_size=16", "rollout.max_new_tokens=4", "ppo.epochs=1")


def test_a_python_grader_scores_held_out_samples_as_the_oracle_does(default_sft_home, tmp_path):
    home = home_with_entries_of(default_sft_home, tmp_path / "home")
    result = rlhf("ppo", *ONE_PROCESS, *SHORT, "eval.gold=python:rlhf.rollouts.rewards:oracle_rewards", home=home)
    assert_ok(result)
    [entry] = [e for e in entries(home) if e["stage"] == "ppo"]
    evals = [r for r in metric_rows(entry) if "eval/score" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for row in evals:
        assert 0.0 <= row["eval/gold_score"] <= 1.0
        # The same samples, the same gold labels through two paths: the same fraction of pairs.
        assert row["eval/reward_gold_agreement"] == row["eval/reward_oracle_agreement"], row
    assert entry["metrics"]["gold_score"] == evals[-1]["eval/gold_score"]


def test_a_grader_that_fails_stops_the_run_in_one_line(default_sft_home, tmp_path):
    home = home_with_entries_of(default_sft_home, tmp_path / "home")
    # rlhf.tasks.chat's grader parses chat-task questions; the toy's "a+b=" prompts are not: it raises or scores 0.
    result = rlhf("ppo", *ONE_PROCESS, *SHORT, "eval.gold=python:rlhf.rollouts.rewards:describe", home=home)
    assert result.code != 0
    assert "eval.gold: python:rlhf.rollouts.rewards:describe raised" in result.stderr and "Traceback" not in result.stderr
    assert not [e for e in entries(home) if e["stage"] == "ppo"]
