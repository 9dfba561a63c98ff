"""`rlhf sft`, `rlhf rm`, `rlhf dpo` and `rlhf ppo` with data.packing=true through the real CLI: a packed run follows
the unpacked run's training curve (the same rows per micro-batch, the same summed loss or log-probs), on one
rank and on two (each rank packing its own share of the micro-batch), and a killed packed run (SFT, DPO, PPO)
resumes to the weights of an uninterrupted one bit for bit; a packed PPO run follows the unpacked run's
metrics step by step."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import (
    DPO_QUICK,
    ONE_PROCESS,
    PPO_QUICK,
    QUICK,
    RM_QUICK,
    assert_ok,
    entries,
    home_with_entries_of,
    kill_after_checkpoint,
    metric_rows,
    resume_and_check,
    rlhf,
)
from tests.integration.test_resume import assert_same_weights

pytestmark = pytest.mark.slow

ARGS = ["-c", QUICK, "train.max_steps=40", "train.save_every=10", "train.log_every=1", "train.eval_every=0", "data.eval=null",
        "eval.max_rows=16"]


def losses(entry: dict) -> list[float]:
    return [row["loss"] for row in metric_rows(entry) if "loss" in row]


def run(home, *args: str, stage: str = "sft") -> dict:
    assert_ok(rlhf(stage, *args, home=home))
    [entry] = [e for e in entries(home) if e["stage"] == stage]
    return entry


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> dict:
    return run(tmp_path_factory.mktemp("unpacked"), *ONE_PROCESS, *ARGS)


@pytest.fixture(scope="module")
def packed_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("packed")
    run(home, *ONE_PROCESS, *ARGS, "data.packing=true")
    return home


@pytest.fixture(scope="module")
def packed(packed_home) -> dict:
    [entry] = entries(packed_home)
    return entry


def test_a_packed_run_learns_along_the_unpacked_curve(packed, unpacked):
    assert packed["config"]["data"]["packing"] is True and unpacked["config"]["data"]["packing"] is False
    curve = losses(packed)
    assert len(curve) == 40 and curve[-1] < 0.5 * curve[0], curve
    # 40 Adam steps in fp32; the per-step forward differs only by summation order (measured: 4e-7 relative).
    assert curve == pytest.approx(losses(unpacked), rel=1e-5)
    assert packed["metrics"]["oracle_score"] > packed["metrics"]["initial_oracle_score"]


def test_two_ranks_packed_follow_the_one_rank_curve(tmp_path, unpacked):
    # The same 32 rows per micro-step split 16 + 16 across ranks, each rank packing its own.
    entry = run_two_ranks(tmp_path, *ARGS, "engine.micro_batch_size=16", "data.packing=true", stage="sft")
    assert losses(entry) == pytest.approx(losses(unpacked), rel=2e-3)


def test_a_killed_packed_run_resumes_to_the_uninterrupted_weights(tmp_path, packed):
    home = tmp_path / "killed"
    run_dir = kill_after_checkpoint("sft", [*ARGS, "data.packing=true"], home=home, min_step=10)
    resumed = resume_and_check("sft", run_dir, home=home, max_steps=40, launch=ONE_PROCESS)
    assert_same_weights(resumed, packed)


def test_packing_tokens_below_max_length_is_refused(tmp_path):
    result = rlhf("sft", *ONE_PROCESS, "-c", QUICK, "data.packing=true", "data.max_length=32", "data.packing_tokens=16", home=tmp_path)
    assert result.code == 2 and "data.packing_tokens (16) must be 0 or at least data.max_length (32)" in result.stderr


# Two ranks on this 2-core machine: one OpenMP thread each (the launcher keeps a value it is given).
TWO_RANKS = {"OMP_NUM_THREADS": "1"}


def run_two_ranks(home, *args: str, stage: str) -> dict:
    assert_ok(rlhf(stage, "-n", "2", *args, home=home, env=TWO_RANKS))
    [entry] = [e for e in entries(home) if e["stage"] == stage]
    return entry


RM_ARGS = ["-c", RM_QUICK, "train.max_steps=20", "engine.micro_batch_size=16", "data.toy.train_size=400", "train.log_every=1",
           "train.eval_every=0", "data.eval=null", "eval.max_rows=16", "eval.reward_stats_rows=16"]


@pytest.fixture(scope="module")
def rm_homes(packed_home, tmp_path_factory) -> dict[str, Path]:
    """From the packed SFT entry, a reward model trained packed and one unpacked, each in a registry of its own."""
    homes = {}
    for packing in ("true", "false"):
        homes[packing] = home_with_entries_of(packed_home, tmp_path_factory.mktemp(f"rm_{packing}"), ("sft",))
        run(homes[packing], *ONE_PROCESS, *RM_ARGS, f"data.packing={packing}", stage="rm")
    return homes


def test_a_packed_reward_model_follows_the_unpacked_curve(rm_homes):
    """Ranked lists of 4 responses, each read at its last token in the packed rows."""
    curves = {packing: losses([e for e in entries(home) if e["stage"] == "rm"][0]) for packing, home in rm_homes.items()}
    assert len(curves["true"]) == 20 and curves["true"][-1] < curves["true"][0]
    # Measured: 4e-6 relative over 30 steps.
    assert curves["true"] == pytest.approx(curves["false"], rel=1e-4)


# Two ranks of each stage cost a minute each: `make test-full` runs them, `make test` the SFT one.
@pytest.mark.full
def test_a_two_rank_packed_reward_model_follows_the_two_rank_unpacked_curve(packed_home, tmp_path):
    """Each rank packs its own 8 groups' sequences; a few steps (two ranks are the slow part here)."""
    curves = {}
    for packing in ("true", "false"):
        home = home_with_entries_of(packed_home, tmp_path / packing, ("sft",))
        curves[packing] = losses(run_two_ranks(home, *RM_ARGS, "train.max_steps=6", "optim.warmup_steps=2", "engine.micro_batch_size=8",
                                               f"data.packing={packing}", stage="rm"))
    assert len(curves["true"]) == 6
    assert curves["true"] == pytest.approx(curves["false"], rel=1e-4)


DPO_ARGS = ["-c", DPO_QUICK, "train.max_steps=20", "train.save_every=10", "train.log_every=1", "train.eval_every=0",
            "engine.micro_batch_size=16", "data.toy.train_size=400", "eval.max_rows=32", "eval.max_prompts=16"]


@pytest.fixture(scope="module")
def dpo_runs(packed_home, tmp_path_factory) -> dict[str, dict]:
    """From the packed SFT entry: DPO against its frozen reference, packed and not (chosen and rejected
    of each pair, and the reference's forward, packed into the same rows)."""
    runs = {}
    for packing in ("true", "false"):
        home = home_with_entries_of(packed_home, tmp_path_factory.mktemp(f"dpo_{packing}"), ("sft",))
        runs[packing] = run(home, *ONE_PROCESS, *DPO_ARGS, f"data.packing={packing}", stage="dpo")
    return runs


def test_packed_dpo_follows_the_unpacked_curve(dpo_runs):
    packed, unpacked = dpo_runs["true"], dpo_runs["false"]
    curve = losses(packed)
    assert len(curve) == 20 and curve[-1] < curve[0], curve
    # Measured: 7e-8 relative over 20 steps.
    assert curve == pytest.approx(losses(unpacked), rel=1e-5)
    # The held-out pairs go through the same packed forward; the sampled KL and oracle answers do not.
    for key in ("loss", "accuracy", "margin", "initial_loss", "kl"):
        assert packed["metrics"][key] == pytest.approx(unpacked["metrics"][key], rel=1e-3, abs=1e-5), key


# Two ranks of each stage cost a minute each: `make test-full` runs them, `make test` the SFT one.
@pytest.mark.full
def test_a_two_rank_packed_dpo_run_follows_the_two_rank_unpacked_curve(packed_home, tmp_path):
    """Each rank packs its own 8 pairs (chosen, rejected and the reference's forward); a few steps."""
    runs = {}
    for packing in ("true", "false"):
        home = home_with_entries_of(packed_home, tmp_path / packing, ("sft",))
        runs[packing] = run_two_ranks(home, *DPO_ARGS, "train.max_steps=6", "train.save_every=0", "engine.micro_batch_size=8",
                                      f"data.packing={packing}", stage="dpo")
    curve = losses(runs["true"])
    assert len(curve) == 6
    assert curve == pytest.approx(losses(runs["false"]), rel=1e-5)
    for key in ("loss", "accuracy", "margin", "initial_loss"):
        assert runs["true"]["metrics"][key] == pytest.approx(runs["false"]["metrics"][key], rel=1e-3, abs=1e-5), key


def test_a_killed_packed_dpo_run_resumes_to_the_uninterrupted_weights(packed_home, dpo_runs, tmp_path):
    home = home_with_entries_of(packed_home, tmp_path / "killed", ("sft",))
    run_dir = kill_after_checkpoint("dpo", [*DPO_ARGS, "data.packing=true"], home=home, min_step=10)
    resumed = resume_and_check("dpo", run_dir, home=home, max_steps=20, launch=ONE_PROCESS)
    assert_same_weights(resumed, dpo_runs["true"])


def test_packed_dpo_refuses_an_unchecked_attention(packed_home, tmp_path):
    home = home_with_entries_of(packed_home, tmp_path / "home", ("sft",))
    result = rlhf("dpo", *ONE_PROCESS, *DPO_ARGS, "data.packing=true", "model.attn_implementation=flex_attention", home=home)
    assert result.code == 2, result.output[-2000:]
    assert ("data.packing=true needs model.attn_implementation in ['eager', 'flash_attention_2', 'sdpa'], "
            "not 'flex_attention'; set data.packing=false") in result.stderr
    assert [e["stage"] for e in entries(home)] == ["sft"] and not list((home / "runs").glob("dpo-*"))


# rlhf ppo: the rollout's scoring (actor, reference, critic, reward model) and the PPO epochs' actor and critic
# forwards (and the ptx loss's) packed. Generation is not: both runs sample the same responses while their weights agree.
PPO_ARGS = ["-c", PPO_QUICK, "train.max_steps=4", "train.save_every=2", "train.eval_every=0", "train.log_every=1",
            "rollout.logprobs_from_generation=false", "ppo.ptx_coef=0.5", "data.ptx=toy", "eval.max_rows=16", "eval.batch_size=16"]
PPO_COMPARED = ("policy_loss", "value_loss", "ptx_loss", "approx_kl", "policy_clipfrac", "score", "kl", "entropy", "explained_variance")


@pytest.fixture(scope="module")
def ppo_runs(rm_homes, tmp_path_factory) -> dict[str, dict]:
    """From the packed SFT and RM entries: PPO packed and not (its old log-probs from the actor's forward, packed too)."""
    runs = {}
    for packing in ("true", "false"):
        home = home_with_entries_of(rm_homes["true"], tmp_path_factory.mktemp(f"ppo_{packing}"), ("sft", "rm"))
        result = rlhf("ppo", *ONE_PROCESS, *PPO_ARGS, f"data.packing={packing}", home=home)
        assert_ok(result)
        assert ("minibatches, packed, ZeRO-" in result.stdout) == (packing == "true")
        [runs[packing]] = [e for e in entries(home) if e["stage"] == "ppo"]
    return runs


def test_packed_ppo_follows_the_unpacked_run(ppo_runs):
    packed, unpacked = ([r for r in metric_rows(ppo_runs[p]) if "policy_loss" in r] for p in ("true", "false"))
    assert [r["step"] for r in packed] == [1, 2, 3, 4] and ppo_runs["true"]["config"]["data"]["packing"] is True
    # Measured: 1.5e-5 relative at most (a policy loss of 1.5e-3), but for explained_variance near 0 (1e-3, 1.2e-7 apart).
    for a, b in zip(packed, unpacked):
        for key in PPO_COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    for key in ("oracle_score", "kl"):
        assert ppo_runs["true"]["metrics"][key] == pytest.approx(ppo_runs["false"]["metrics"][key], rel=1e-3, abs=1e-5), key


# Two ranks of each stage cost a minute each: `make test-full` runs them, `make test` the SFT one.
@pytest.mark.full
def test_a_two_rank_packed_ppo_run_follows_the_two_rank_unpacked_run(rm_homes, tmp_path):
    """Each rank packs its own rollouts; 2 steps."""
    rows = {}
    for packing in ("true", "false"):
        home = home_with_entries_of(rm_homes["true"], tmp_path / packing, ("sft", "rm"))
        entry = run_two_ranks(home, *PPO_ARGS, "train.max_steps=2", "train.save_every=0", f"data.packing={packing}", stage="ppo")
        rows[packing] = [r for r in metric_rows(entry) if "policy_loss" in r]
    assert len(rows["true"]) == 2
    for a, b in zip(rows["true"], rows["false"]):
        for key in PPO_COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_a_killed_packed_ppo_run_resumes_to_the_uninterrupted_weights(rm_homes, ppo_runs, tmp_path):
    home = home_with_entries_of(rm_homes["true"], tmp_path / "killed", ("sft", "rm"))
    run_dir = kill_after_checkpoint("ppo", [*ONE_PROCESS, *PPO_ARGS, "data.packing=true"], home=home, min_step=2)
    resumed = resume_and_check("ppo", run_dir, home=home, max_steps=4, loss_key="policy_loss", launch=ONE_PROCESS)
    assert_same_weights(resumed, ppo_runs["true"])


def test_packed_ppo_refuses_an_unchecked_attention(rm_homes, tmp_path):
    home = home_with_entries_of(rm_homes["true"], tmp_path / "home", ("sft", "rm"))
    result = rlhf("ppo", *ONE_PROCESS, *PPO_ARGS, "data.packing=true", "model.attn_implementation=flex_attention", home=home)
    assert result.code == 2, result.output[-2000:]
    assert ("data.packing=true needs model.attn_implementation in ['eager', 'flash_attention_2', 'sdpa'], "
            "not 'flex_attention'; set data.packing=false") in result.stderr
    assert not list((home / "runs").glob("ppo-*"))
