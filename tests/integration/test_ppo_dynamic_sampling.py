"""`rlhf ppo -c ppo-dapo ppo.dynamic_sampling=true` through the CLI on the CPU: groups whose rewards are all
equal are dropped and more prompts drawn until the batch is full (or the cap is hit and dropped groups fill
it), the counts logged every step; and the settings refused before anything is created."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import (
    ONE_PROCESS,
    assert_ok,
    entries,
    kill_after_checkpoint,
    metric_rows,
    resume_and_check,
    rlhf,
    rlhf_here,
)
from tests.integration.test_resume import assert_same_weights
from tests.integration.test_sft_errors import assert_user_error

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

FUNCS = "python:tests.reward_functions"
# The random-init toy policy and a reward function: no SFT or RM entry needed. The overlong penalty is off so
# that a group's scores are the function's alone.
SHORT = ("-c", "ppo-dapo", "model.name_or_path=toy", "train.max_steps=2", "train.eval_every=0", "eval.max_rows=16",
         "eval.batch_size=16", "rollout.max_new_tokens=4", "ppo.epochs=1", "reward.overlong_buffer=null",
         "critic_optim.warmup_steps=0", "ppo.dynamic_sampling=true")
GROUPS_PER_RANK = 16 // 4  # ppo-dapo: rollout.batch_size 16, groups of 4


def step_rows(home) -> list[dict]:
    ppo = next(e for e in entries(home) if e["stage"] == "ppo")
    rows = [r for r in metric_rows(ppo) if "policy_loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        # The trained batch is always whole: 16 responses, in kept and filler groups.
        assert row["kept_groups"] + row["filler_groups"] == GROUPS_PER_RANK, row
        assert row["truncated_responses"] == pytest.approx(16 * row["no_eos_fraction"]), row
        drawn = row["kept_groups"] + row["filler_groups"] + row["dropped_groups"] + row["surplus_groups"]
        assert drawn == GROUPS_PER_RANK * row["sampling_rounds"], row
    return rows


def test_groups_of_equal_rewards_are_dropped_and_the_batch_refilled(tmp_path):
    """prompt_parity scores every response to an even-length prompt 0: about half the groups are all equal."""
    home = tmp_path / "home"
    result = rlhf("ppo", *ONE_PROCESS, *SHORT, f"reward.name_or_path=[{FUNCS}:prompt_parity]", "ppo.max_sampling_rounds=6",
                  home=home)
    assert_ok(result)
    assert "dynamic sampling: groups whose shaped scores are all equal are dropped" in " ".join(result.stdout.split())
    rows = step_rows(home)
    assert sum(r["dropped_groups"] for r in rows) > 0
    assert any(r["sampling_rounds"] > 1 for r in rows)
    assert all(r["kept_groups"] == GROUPS_PER_RANK and r["filler_groups"] == 0 for r in rows), rows
    assert all(r["group_score_std"] > 0 for r in rows)


def test_at_the_cap_dropped_groups_fill_the_batch(tmp_path):
    """A constant reward: every group is all equal, so each step draws max_sampling_rounds rounds and trains on fillers."""
    home = tmp_path / "home"
    assert_ok(rlhf("ppo", *ONE_PROCESS, *SHORT, f"reward.name_or_path=[{FUNCS}:constant]", "ppo.max_sampling_rounds=2",
                   home=home))
    for row in step_rows(home):
        assert (row["sampling_rounds"], row["kept_groups"], row["filler_groups"]) == (2, 0, GROUPS_PER_RANK), row
        assert row["dropped_groups"] == GROUPS_PER_RANK and row["group_score_std"] == 0, row


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """The extra rounds move the prompt stream: the checkpoint's state must carry them for the resumed run to draw
    the same prompts (and RNG) as an uninterrupted one."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the killed run is a fresh interpreter: tests.reward_functions from here
    reward = f"reward.name_or_path=[{FUNCS}:prompt_parity]"  # a function is repeated on --resume
    args = [*ONE_PROCESS, *SHORT, reward, "train.max_steps=10", "train.save_every=2", "train.log_every=1"]
    run_dir = kill_after_checkpoint("ppo", args, home=tmp_path / "killed", min_step=2)
    resumed = resume_and_check("ppo", run_dir, home=tmp_path / "killed", max_steps=10, loss_key="policy_loss",
                               launch=(*ONE_PROCESS, reward))
    assert sum(r["sampling_rounds"] - 1 for r in metric_rows(resumed) if "policy_loss" in r) > 0
    assert_ok(rlhf("ppo", *args, home=tmp_path / "whole"))
    [whole] = [e for e in entries(tmp_path / "whole") if e["stage"] == "ppo"]
    assert_same_weights(resumed, whole)


@pytest.mark.parametrize(("override", "expected"), [
    ("ppo.estimator=gae", "ppo.dynamic_sampling drops groups"),
    ("rollout.samples_per_prompt=1", "rollout.samples_per_prompt to at least 2"),
    ("ppo.max_sampling_rounds=0", "ppo.max_sampling_rounds must be at least 1"),
    ("rollout.env=python:rlhf.tasks.envs:ToyRetryEnv", "ppo.dynamic_sampling is not supported with rollout.env"),
])
def test_bad_dynamic_sampling_settings_stop_before_anything_starts(tmp_path, override, expected):
    home = tmp_path / "home"
    result = rlhf_here("ppo", *SHORT, "reward.name_or_path=[oracle]", override, home=home)
    assert_user_error(result, expected)
    assert not (home / "runs").exists()
