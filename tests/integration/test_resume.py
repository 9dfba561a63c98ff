"""A run killed (SIGKILL to its whole process tree, like a lost node) after a checkpoint and resumed
ends with the weights an uninterrupted run of the same config ends with, bit for bit: one case per
training loop (sft, rm, dpo, ppo with a critic, critic-free ppo with the actor alone). Best-of-N's dataset is the same
check for its loop (tests/integration/test_bon_cli.py).

The killed run is the console script under DeepSpeed's launcher, as users start it (so each stage
goes through the real CLI and launcher here); the resume and the uninterrupted run go through the CLI
in forks of the test process (tests/forked.py) on one rank with the same thread count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
    resume_and_check,
    rlhf,
)

pytestmark = pytest.mark.slow

QUIET = ("train.eval_every=0", "train.log_every=1", "eval.max_rows=16")
# Long enough that the kill lands well before the end (a toy step takes tens of milliseconds);
# checkpoints often enough that the resume replays several steps past one.
CASES = {
    "sft": (("sft",), ["-c", QUICK, "train.max_steps=100", "train.save_every=10", "data.eval=null", *QUIET], 10),
    "rm": (("sft",), ["-c", RM_QUICK, "train.max_steps=60", "train.save_every=10", "data.eval=null", "eval.reward_stats_rows=16",
                      *QUIET], 10),
    "dpo": (("sft",), ["-c", DPO_QUICK, "train.max_steps=80", "train.save_every=10", "data.eval=null", *QUIET], 10),
    "ppo": (("sft", "rm"), ["-c", PPO_QUICK, "train.max_steps=12", "train.save_every=2", *QUIET], 2),
    "ppo-reinforce_pp": (("sft", "rm"), ["-c", PPO_QUICK, "ppo.estimator=reinforce_pp", "train.max_steps=12", "train.save_every=2",
                                         *QUIET], 2),
}


def weights(entry: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(entry["path"]) / "model.safetensors"))


def assert_same_weights(resumed: dict, whole: dict) -> None:
    a, b = weights(resumed), weights(whole)
    assert a.keys() == b.keys()
    differ = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ after the resume, e.g. {differ[:3]}"


@pytest.mark.parametrize("case", list(CASES))
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(case, request, tmp_path):
    parents, args, min_step = CASES[case]
    stage = case.split("-")[0]
    # The SFT-like stages start as soon as the session's SFT entry exists, before its RM is trained.
    source = request.getfixturevalue("default_rm_home" if "rm" in parents else "default_sft_home")
    killed_home = home_with_entries_of(source, tmp_path / "killed", parents)
    run_dir = kill_after_checkpoint(stage, args, home=killed_home, min_step=min_step)
    if case == "ppo-reinforce_pp":  # critic-free: no critic engine to checkpoint
        [step_dir] = sorted((run_dir / "checkpoints").glob("step-*"))[-1:]
        assert {p.name for p in step_dir.iterdir() if p.is_dir()} == {"actor"}
    max_steps = int(next(a for a in args if a.startswith("train.max_steps=")).split("=")[1])
    loss_key = "policy_loss" if stage == "ppo" else "loss"
    resumed = resume_and_check(stage, run_dir, home=killed_home, max_steps=max_steps, loss_key=loss_key, launch=ONE_PROCESS)

    whole_home = home_with_entries_of(source, tmp_path / "whole", parents)
    assert_ok(rlhf(stage, *ONE_PROCESS, *args, home=whole_home))
    started_from = {e["id"] for e in entries(source)}
    [whole] = [e for e in entries(whole_home) if e["stage"] == stage and e["id"] not in started_from]
    assert_same_weights(resumed, whole)
    if case == "ppo":  # the critic trained on, from its own checkpoint, to the same weights too
        [resumed_critic] = [e for e in entries(killed_home) if e["stage"] == "critic"]
        [whole_critic] = [e for e in entries(whole_home) if e["stage"] == "critic"]
        assert_same_weights(resumed_critic, whole_critic)

