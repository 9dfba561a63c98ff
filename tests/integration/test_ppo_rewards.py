"""`rlhf ppo` with programmatic rewards: the oracle alone (no reward model loaded), a reward model
plus a python: function, a function that fails on one rank, and the checks before any rank starts.

The sft and rm entries are real toy model folders, built but not trained (tests/integration/
test_ppo_errors.py): these runs check the reward's plumbing, not what PPO learns. The python:
functions live in tests/reward_functions.py and import because the repository root is on
PYTHONPATH, which the launcher passes to the ranks as a user's own package path would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.models.sources import REWARD_STATS_FILE
from tests.integration.conftest import ONE_PROCESS, PPO_QUICK, REPO, assert_ok, entries, metric_rows, rlhf, rlhf_here
from tests.integration.test_ppo_errors import ppo_runs, sft_and_rm
from tests.integration.test_sft_errors import assert_user_error

FUNCS = "python:tests.reward_functions"
SHORT = ("-c", PPO_QUICK, "train.max_steps=2", "eval.max_rows=16", "eval.batch_size=16")
ON_PATH = {"PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_oracle_reward_trains_without_a_reward_model(home):
    sft, critic = sft_and_rm(home)
    (Path(critic.path) / REWARD_STATS_FILE).unlink()  # no reward model's statistics are read either
    result = rlhf("ppo", *ONE_PROCESS, *SHORT, "reward.name_or_path=oracle", home=home)
    assert_ok(result)
    assert "reward = 1 x oracle (no reward model loaded)" in result.stdout
    ppo = next(e for e in entries(home) if e["stage"] == "ppo")
    assert ppo["config"]["reward"]["name_or_path"] == ["oracle"]
    assert ppo["parents"] == [sft.id, critic.id]  # the critic's rm entry; no reward entry
    rows = [r for r in metric_rows(ppo) if "policy_loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert "rm_score" not in row and 0.0 <= row["reward/oracle"] <= 1.0


@pytest.mark.slow
def test_reward_model_plus_function_is_their_weighted_sum_through_the_launcher(home):
    sft, rm = sft_and_rm(home)  # rm's statistics: mean 0.5, std 2.0
    result = rlhf("ppo", *SHORT, f"reward.name_or_path=[rm:latest, {FUNCS}:response_length]", "reward.weights=[1, 0.5]",
                  "ppo.score_clip=null", "ppo.no_eos_score=null", home=home, env=ON_PATH)
    assert_ok(result)
    assert f"reward = 1 x rm:latest + 0.5 x {FUNCS}:response_length" in result.stdout
    ppo = next(e for e in entries(home) if e["stage"] == "ppo")
    assert ppo["parents"] == [sft.id, rm.id]
    for row in (r for r in metric_rows(ppo) if "policy_loss" in r):
        length = row[f"reward/{FUNCS}:response_length"]  # characters of the decoded responses
        assert length > 0
        # Unclipped, the mean score is linear in the components' means.
        assert row["score"] == pytest.approx((row["rm_score"] - 0.5) / 2.0 + 0.5 * length, abs=1e-5)


@pytest.mark.slow
def test_function_failing_on_one_rank_stops_every_rank_in_one_line_with_a_checkpoint(home):
    sft_and_rm(home)
    result = rlhf("ppo", "-n", "2", *SHORT, "data.eval=null", f"reward.name_or_path={FUNCS}:raises_on_rank_1",
                  home=home, env=ON_PATH)
    assert_user_error(result, f"{FUNCS}:raises_on_rank_1 raised RuntimeError: reward server unreachable from rank 1",
                      "stopped in step 1", "rlhf ppo --resume --run ",
                      f"'reward.name_or_path=[{FUNCS}:raises_on_rank_1]'")  # the resume command confirms the function
    [run_dir] = ppo_runs(home)
    assert json.loads((run_dir / "checkpoints" / "resume.json").read_text())["step"] == 0
    assert not [e for e in entries(home) if e["stage"] in ("ppo", "critic")]


@pytest.mark.parametrize(("overrides", "fragments"), [
    ([f"reward.name_or_path={FUNCS}_missing:f"], ["reward.name_or_path", "cannot import module 'tests.reward_functions_missing'"]),
    ([f"reward.name_or_path={FUNCS}:nope"], ["module 'tests.reward_functions' has no attribute 'nope'"]),
    ([f"reward.name_or_path={FUNCS}:NOT_A_FUNCTION"], ["NOT_A_FUNCTION is a int, not a function"]),
    (["reward.name_or_path=python:./reward.py:score"], ["is not python:package.module:function"]),
    (["reward.name_or_path=oracle,rm:latest", "reward.weights=[1]"], ["reward.weights has 1 weight(s) for 2 source(s)"]),
])
def test_bad_reward_stops_before_any_rank(home, overrides, fragments):
    sft_and_rm(home)
    assert_user_error(rlhf_here("ppo", *overrides, home=home, env=ON_PATH), *fragments)
    assert not ppo_runs(home)


def test_oracle_without_the_embedded_default_data_stops_before_any_rank(home, tmp_path):
    sft_and_rm(home)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    assert_user_error(rlhf_here("ppo", "reward.name_or_path=oracle", f"data.train={prompts}", home=home),
                      "reward.name_or_path=oracle grades the embedded default's task only", "data.train=")
    assert not ppo_runs(home)


@pytest.mark.slow
def test_reward_ensemble_scores_mean_minus_penalty_times_std_and_logs_its_spread(home):
    from rlhf.store.start_record import START_FILE
    from tests.integration.test_rm_errors import publish

    sft, rm = sft_and_rm(home)  # rm's statistics: mean 0.5, std 2.0
    member = publish(home, "rm", head="scalar")  # the same toy weights: other statistics make the members disagree
    (Path(member.path) / REWARD_STATS_FILE).write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    result = rlhf("ppo", *ONE_PROCESS, *SHORT, f"reward.name_or_path=rm:{rm.id}", f"critic.name_or_path=rm:{rm.id}",
                  f"reward_ensemble.name_or_path=[rm:{member.id}]", "reward_ensemble.penalty=0.5", home=home)
    assert_ok(result)
    said = " ".join(result.stdout.split())  # the console wraps long lines where the paths make them long
    assert f"reward = 1 x rm:{rm.id} (its reward model with 1 more: mean - 0.5 x std)" in said
    ppo = next(e for e in entries(home) if e["stage"] == "ppo")
    assert ppo["config"]["reward_ensemble"] == {"name_or_path": [f"rm:{member.id}"], "penalty": 0.5}
    assert member.id in ppo["parents"]
    rows = metric_rows(ppo)
    steps = [r for r in rows if "policy_loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["reward_ensemble_std"] > 0 for r in steps)
    evals = [r["eval/reward_ensemble_std"] for r in rows if "eval/score" in r]
    assert evals and all(std > 0 for std in evals)
    # The start record pins the member by entry and content, as it does the main reward model.
    sources = json.loads((Path(ppo["run_dir"]) / START_FILE).read_text())["sources"]
    assert sources["reward_ensemble.name_or_path[0]"].startswith(f"{member.id} sha256:")
    assert sources["reward.name_or_path[0]"].startswith(f"{rm.id} sha256:")
