"""`rlhf ppo -c ppo-dapo` through the CLI on the CPU: DAPO's recipe (decoupled clip, overlong penalty and
filter) with truncated importance sampling on top, and what it logs each step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.integration.conftest import ONE_PROCESS, assert_ok, entries, home_with_entries_of, metric_rows, rlhf

pytestmark = pytest.mark.slow


@pytest.fixture
def home(default_rm_home, tmp_path) -> Path:
    """The session pipeline's SFT and RM entries (conftest.default_rm_home), in a registry of this test's own."""
    return home_with_entries_of(default_rm_home, tmp_path / "home")


def test_dapo_preset_with_tis_logs_the_mismatch_and_truncations(home):
    """3 new tokens cut about half the toy's answers: the overlong penalty and filter have work to do."""
    result = rlhf("ppo", *ONE_PROCESS, "-c", "ppo-dapo", "train.max_steps=2", "train.eval_every=0", "eval.max_rows=16",
                  "eval.batch_size=16", "critic_optim.warmup_steps=2", "rollout.max_new_tokens=3", "ppo.tis_cap=2",
                  "ppo.max_mismatch_kl=0.5", "rollout.logprobs_from_generation=false", home=home)
    assert_ok(result)
    said = " ".join(result.stdout.split())  # the console wraps long lines
    assert "grpo: critic-free" in said and "token ratio clipped to [1 - 0.2, 1 + 0.28]" in said
    ppo = next(e for e in entries(home) if e["stage"] == "ppo")
    rows = [r for r in metric_rows(ppo) if "policy_loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        # fp32 on the CPU: generation's log-probs and the actor's forward agree up to rounding.
        assert 0 <= row["train/mismatch_kl"] < 1e-4, row
        assert row["truncated_responses"] == pytest.approx(16 * row["no_eos_fraction"]) and 0 <= row["truncated_responses"] <= 16
        assert all(math.isfinite(row[k]) for k in ("policy_loss", "policy_clipfrac", "score")), row
    assert sum(r["truncated_responses"] for r in rows) > 0
