"""`rlhf ppo` with critic-free estimators (ppo.estimator grpo, rloo, reinforce_pp) through the CLI on
the CPU: three models, no critic entry or checkpoint, no value metrics, groups of one prompt on one
rank, and the settings refused before any rank starts. (Kill and resume: tests/integration/test_resume.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import (
    ONE_PROCESS,
    PPO_QUICK,
    assert_ok,
    entries,
    home_with_entries_of,
    metric_rows,
    rlhf,
    rlhf_here,
)
from tests.integration.test_sft_errors import assert_user_error

pytestmark = pytest.mark.slow

VALUE_METRICS = ("value_loss", "value_clipfrac", "explained_variance", "critic_lr")
SHORT = ("-c", PPO_QUICK, "train.max_steps=3", "train.eval_every=0", "eval.max_rows=16", "eval.batch_size=16")


@pytest.fixture
def home(default_rm_home, tmp_path) -> Path:
    """The session pipeline's SFT and RM entries (conftest.default_rm_home), in a registry of this test's own."""
    return home_with_entries_of(default_rm_home, tmp_path / "home")


def critic_free_entry(home: Path) -> dict:
    """The run's only new entry: a ppo entry descending from the SFT and RM entries, no critic companion."""
    by_stage = {e["stage"]: e for e in entries(home)}
    assert set(by_stage) == {"sft", "rm", "ppo"}, by_stage.keys()
    ppo = by_stage["ppo"]
    assert ppo["parents"] == [by_stage["sft"]["id"], by_stage["rm"]["id"]] and "critic" not in ppo["metrics"]
    assert not (Path(ppo["run_dir"]) / "critic").exists()
    return ppo


def step_rows(entry: dict) -> list[dict]:
    rows = [r for r in metric_rows(entry) if "policy_loss" in r]
    assert rows and all(not set(VALUE_METRICS) & set(r) for r in rows), rows[0].keys()
    return rows


def test_grpo_with_kl_in_the_loss_on_one_rank(home):
    result = rlhf("ppo", *ONE_PROCESS, *SHORT, "ppo.estimator=grpo", "rollout.samples_per_prompt=4", "ppo.kl_in=loss", home=home)
    assert_ok(result)
    assert "grpo: critic-free, 3 models (actor, reference, reward)" in result.stdout
    assert "KL in the loss (k3), loss aggregation sequence_mean" in result.stdout
    entry = critic_free_entry(home)
    rows = step_rows(entry)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # The KL term is measured (k3 >= 0, 0 only before the policy moves) and the groups disagree enough to learn from.
    assert all(r["kl_loss"] >= 0 for r in rows) and rows[-1]["kl_loss"] > 0
    assert all(r["group_score_std"] > 0 for r in rows)
    assert entry["metrics"]["kl"] != 0  # the actor moved away from the reference


def test_rloo_groups_stay_on_their_rank_with_two_ranks(home):
    """Sampling greedily (top_k=1), a prompt's K responses are the same, so a group of one prompt has
    no spread and every leave-one-out advantage is 0 (no loss, no update), while the batch's
    prompts still score differently. A group mixing prompts, across ranks or within one, would not."""
    result = rlhf("ppo", "-n", "2", *SHORT, "ppo.estimator=rloo", "rollout.samples_per_prompt=2", "rollout.top_k=1",
                  home=home, env={"OMP_NUM_THREADS": "1"})
    assert_ok(result)
    assert "rollouts x 2 rank(s)" in result.stdout and "rloo: critic-free" in result.stdout
    rows = step_rows(critic_free_entry(home))
    for row in rows:
        assert row["group_score_std"] < 1e-6 and row["score_std"] > 0.05, row
        assert abs(row["policy_loss"]) < 1e-6 and row["grad_norm"] < 1e-6, row


@pytest.mark.parametrize("overrides, fragments", [
    (["ppo.estimator=grpo"], ["ppo.estimator=grpo", "rollout.samples_per_prompt", "got 1"]),
    (["ppo.estimator=rloo", "rollout.samples_per_prompt=3"], ["rollout.batch_size (64)", "multiple of rollout.samples_per_prompt (3)"]),
])
def test_bad_estimator_settings_stop_before_any_rank(tmp_path, overrides, fragments):
    result = rlhf_here("ppo", *overrides, home=tmp_path)
    assert_user_error(result, *fragments)
    assert not (tmp_path / "runs").exists()


def test_preflight_needs_no_critic_source_without_a_critic(tmp_path):
    """A critic-free run never resolves critic.name_or_path: a missing critic entry stops gae, not grpo."""
    from tests.integration.test_ppo_errors import sft_and_rm

    sft_and_rm(tmp_path)
    missing_critic = "critic.name_or_path=rm:nosuchrun"
    assert_user_error(rlhf_here("ppo", "--dry-run", missing_critic, home=tmp_path),
                      "critic.name_or_path=rm:nosuchrun: unknown registry reference 'rm:nosuchrun'")
    result = rlhf_here("ppo", "--dry-run", missing_critic, "ppo.estimator=grpo", "rollout.samples_per_prompt=4", home=tmp_path)
    assert result.code == 0, result.output[-3000:]
    assert not list((tmp_path / "runs").glob("ppo-*"))  # a dry run starts nothing
