"""`rlhf ppo rollout.env=...` through the CLI on the CPU: multi-turn episodes of the embedded default's
toy model against ToyRetryEnv (a wrong sum is asked again), with GAE and with GRPO, their metrics and
entries; a kill and resume that must repeat the environment; two ranks under ZeRO-3 with turns that end at
a stop string, killed and resumed; and the settings refused before any rank starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.envs import LOG_ENV
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


def calls_of(log: Path) -> dict[tuple[str, float], list[list[list[dict]]]]:
    """tests.envs' records by (rank, process start): each sample_episodes call (its resets come together) as
    its episodes, each the list of its turns ({text, reward})."""
    calls: dict[tuple[str, float], list[list[list[dict]]]] = {}
    for path in sorted(log.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        process = calls.setdefault((path.name.split("-")[0], rows[0]["started"]), [])
        episodes: dict[int, list[dict]] = {}
        for row, before in zip(rows, [{}, *rows]):
            if row.get("reset"):
                if not before.get("reset"):
                    process.append([])
                episodes[row["episode"]] = []
                process[-1].append(episodes[row["episode"]])
            else:
                episodes[row["episode"]].append(row)
    return calls


# make test-full, like the other killed two-rank runs (tests/integration/test_ppo_cli.py).
@pytest.mark.full
def test_two_ranks_under_zero3_stop_turns_at_their_stop_strings_agree_and_resume(tmp_path, monkeypatch):
    """Under ZeRO-3 every generation step is a collective: ranks whose rows stop at different tokens (and whose
    episodes take different turns) must still step together. The run is killed after a checkpoint and resumed on
    its two ranks; each resumed step's metrics (all-reduced) are those of both ranks' recorded episodes."""
    home, log = tmp_path / "home", tmp_path / "env-log"
    log.mkdir()
    monkeypatch.setenv(LOG_ENV, str(log))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each rank its share of the cores
    env = "rollout.env=python:tests.envs:StopAtDigits"
    args = ["-n", "2", *SHORT, *TOY, "engine.zero_stage=3", "ppo.estimator=grpo", "rollout.samples_per_prompt=4", env,
            "rollout.max_turns=2", "train.max_steps=6", "train.save_every=1"]
    run_dir = kill_after_checkpoint("ppo", args, home=home, min_step=1)
    entry = resume_and_check("ppo", run_dir, home=home, max_steps=6, loss_key="policy_loss", launch=(env,))
    calls = calls_of(log)
    assert {rank for rank, _ in calls} == {"0", "1"} and len(calls) == 4  # two ranks, killed and resumed
    texts = [turn["text"] for process in calls.values() for call in process for episode in call for turn in episode]
    stopped = [text for text in texts if any(c.isdigit() for c in text)]
    assert stopped and all(not any(c.isdigit() for c in text[:-1]) for text in stopped)  # each turn ends at its first digit
    # The resumed run's two processes (started last): a call of rollout.batch_size (16) episodes per step on each
    # rank (evaluation's calls hold 8); the metrics average both ranks' episodes.
    first, second = ([call for call in calls[key] if len(call) == 16] for key in sorted(calls, key=lambda k: k[1])[-2:])
    rows = [r for r in metric_rows(entry) if "policy_loss" in r]
    assert 1 <= len(first) == len(second) < len(rows)
    for row, a, b in zip(rows[-len(first):], first, second):
        episodes = a + b
        assert row["turns"] == pytest.approx(sum(len(e) for e in episodes) / 32)
        assert row["env_reward"] == pytest.approx(sum(t["reward"] for e in episodes for t in e) / 32, abs=1e-6)


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
