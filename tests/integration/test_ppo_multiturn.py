"""`rlhf ppo rollout.env=...` through the CLI on the CPU: multi-turn episodes of the embedded default's
toy model against ToyRetryEnv (a wrong sum is asked again), with GAE and with GRPO, their metrics and
entries; a kill and resume that must repeat the environment; and the settings refused before any rank starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import (
    ONE_PROCESS,
    PPO_QUICK,
    assert_ok,
    entries,
    home_with_entries_of,
    kill_after_checkpoint,
    metric_rows,
    resume_and_check,
    rlhf,
    rlhf_here,
)
from tests.integration.test_sft_errors import assert_user_error

pytestmark = pytest.mark.slow

ENV = "rollout.env=python:rlhf.tasks.envs:ToyRetryEnv"
# The random-init toy policy and the oracle: no SFT entry needed, and the untrained policy answers wrong, so
# every episode takes its second turn.
TOY = ("model.name_or_path=toy", "reward.name_or_path=[oracle]")
SHORT = ("-c", PPO_QUICK, "train.max_steps=2", "train.eval_every=0", "eval.max_rows=16", "eval.batch_size=16",
         "rollout.max_new_tokens=4", "ppo.epochs=1")


@pytest.fixture(scope="module")
def rm_home(tmp_path_factory) -> Path:
    """A reward model of two steps from the toy model, for GAE's critic (its head and backbone; the score is the oracle's)."""
    home = tmp_path_factory.mktemp("multiturn_rm")
    assert_ok(rlhf("rm", *ONE_PROCESS, "-c", "rm-toy-quick", "model.name_or_path=toy", "train.max_steps=2", "optim.warmup_steps=0",
                   "train.eval_every=0", "train.save_every=0", "eval.max_rows=8", "eval.reward_stats_rows=16", home=home))
    return home


def episode_rows(entry: dict) -> list[dict]:
    rows = [r for r in metric_rows(entry) if "policy_loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        # 4 tokens of a wrong answer, then "\nno. a+b=" (9 to 11 tokens), then the second turn.
        assert row["turns"] > 1 and row["turns"] <= 2 and 9 <= row["env_tokens"] / (row["turns"] - 1) <= 11, row
        assert row["response_length"] <= 2 * 4  # the policy's tokens only
    return rows


def test_multi_turn_gae_with_rewards_per_turn(rm_home, tmp_path):
    home = home_with_entries_of(rm_home, tmp_path / "home")
    result = rlhf("ppo", *ONE_PROCESS, *SHORT, *TOY, "critic.name_or_path=rm:latest", ENV, "rollout.max_turns=2",
                  "rollout.turn_rewards=per_turn", home=home)
    assert_ok(result)
    by_stage = {e["stage"]: e for e in entries(home)}
    assert by_stage["ppo"]["metrics"]["critic"] == f"{by_stage['ppo']['id']}-critic"
    for row in episode_rows(by_stage["ppo"]):
        assert 0 <= row["env_reward"] <= 2 and "value_loss" in row and "explained_variance" in row


def test_multi_turn_grpo_with_the_reward_at_the_end(tmp_path):
    home = tmp_path / "home"
    result = rlhf("ppo", *ONE_PROCESS, *SHORT, *TOY, "ppo.estimator=grpo", "rollout.samples_per_prompt=4", ENV,
                  "rollout.max_turns=2", "rollout.max_episode_tokens=24", home=home)
    assert_ok(result)
    said = " ".join(result.stdout.split())  # the console wraps long lines
    assert ("multi-turn: python:rlhf.tasks.envs:ToyRetryEnv, up to 2 turns of 4 tokens and 24 tokens an episode, environment rewards "
            "at the end") in said
    [entry] = entries(home)
    assert entry["stage"] == "ppo" and Path(entry["path"]).is_dir()
    for row in episode_rows(entry):
        assert "group_score_std" in row and "value_loss" not in row


def test_a_killed_multi_turn_run_resumes_only_with_its_environment_repeated(tmp_path):
    home = tmp_path / "home"
    args = [*SHORT, *TOY, "ppo.estimator=grpo", "rollout.samples_per_prompt=4", ENV, "rollout.max_turns=2",
            "train.max_steps=12", "train.save_every=1"]
    run_dir = kill_after_checkpoint("ppo", ["--launcher", "python", *args], home=home, min_step=1)
    refused = rlhf_here("ppo", "--resume", home=home)
    assert_user_error(refused, "rollout.env", "repeat it")
    entry = resume_and_check("ppo", run_dir, home=home, max_steps=12, loss_key="policy_loss", launch=(*ONE_PROCESS, ENV))
    assert all(r["turns"] > 1 for r in metric_rows(entry) if "policy_loss" in r)


@pytest.mark.parametrize(("override", "expected"), [
    ("rollout.env=python:no_such_module_here:Env", "cannot import module 'no_such_module_here'"),
    ("rollout.env=python:rlhf.rollouts.multiturn:checked_step", "is a function, not a class"),
    ("rollout.env=python:rlhf.tasks.envs:NoSuchEnv", "has no attribute 'NoSuchEnv'"),
    ("rollout.env=rlhf.tasks.envs:ToolEnv", "is not python:package.module:Class"),
    ("rollout.max_turns=0", "rollout.max_turns must be at least 1"),
    ("rollout.env=null", "apply to multi-turn rollouts"),
])
def test_bad_multi_turn_settings_stop_before_anything_starts(tmp_path, override, expected):
    home = tmp_path / "home"
    result = rlhf_here("ppo", *TOY, "ppo.estimator=grpo", "rollout.samples_per_prompt=4", ENV, "rollout.max_turns=2", override,
                       home=home)
    assert_user_error(result, expected)
    assert not (home / "runs").exists()
