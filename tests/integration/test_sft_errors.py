"""A user's mistakes: one line naming what and where, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ONE_PROCESS, REPO, Result, cli_env, rlhf, rlhf_here


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def assert_user_error(result: Result, *fragments: str) -> None:
    assert result.code == 2, result.output[-3000:]
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


GOOD = {"prompt": "1+1=", "response": "2"}


def test_malformed_jsonl_row_names_file_and_line(home):
    data = write_jsonl(home / "train.jsonl", [GOOD, GOOD, '{"prompt": "2+2=", "response": ', GOOD])
    assert_user_error(rlhf_here("sft", f"data.train={data}", home=home), "train.jsonl:3", "not valid JSON")
    assert not (home / "runs").exists()  # nothing was created for a run that never started


def test_empty_dataset(home):
    data = home / "empty.jsonl"
    data.write_text("\n")
    assert_user_error(rlhf_here("sft", f"data.train={data}", home=home), "empty.jsonl", "no rows")


def test_unknown_config_key(home):
    assert_user_error(rlhf_here("sft", "optim.warmup_step=3", home=home), "optim.warmup_step", "did you mean 'optim.warmup_steps'")


def test_unknown_key_in_a_config_file_names_its_line(home):
    config = home / "c.yaml"
    config.write_text("train:\n  max_steps: 5\n  max_stpes: 6\n")
    assert_user_error(rlhf_here("sft", "-c", str(config), home=home), f"{config}:3", "train.max_stpes")


def test_wrong_type(home):
    assert_user_error(rlhf_here("sft", "engine.micro_batch_size=big", home=home), "engine.micro_batch_size", "expects int")


def test_unknown_registry_reference(home):
    assert_user_error(rlhf_here("sft", "model.name_or_path=sft:nope", home=home), "sft:nope", "rlhf registry ls")


def test_prompt_longer_than_max_length(home):
    data = write_jsonl(home / "long.jsonl", [GOOD, {"prompt": "9" * 40 + "+1=", "response": "1"}])
    assert_user_error(
        rlhf_here("sft", f"data.train={data}", "data.eval=null", "data.max_length=16", home=home),
        "long.jsonl:2", "data.max_length=16", "data.long_prompts=skip",
    )


def test_missing_data_file(home):
    assert_user_error(rlhf_here("sft", f"data.train={home / 'nope.jsonl'}", home=home), "nope.jsonl", "not found")


def test_missing_config_file(home):
    assert_user_error(rlhf_here("sft", "-c", str(home / "nope.yaml"), home=home), "nope.yaml")


def test_unreachable_hub_model(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no hub; fail fast instead of retrying
    # A process of its own: huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported.
    assert_user_error(rlhf("sft", "model.name_or_path=someorg/missing-model", home=home, fresh_interpreter=True),
                      "someorg/missing-model")


def test_dry_run_prints_the_command_and_creates_nothing(home):
    result = rlhf_here("sft", "-n", "2", "--dry-run", "engine.zero_stage=3", home=home)
    assert result.code == 0, result.output
    assert "zero_stage: 3" in result.stdout
    assert "deepspeed.launcher.runner --num_gpus 2" in result.stdout and "--module rlhf.stages.sft --run-dir" in result.stdout
    assert not (home / "runs").exists()


@pytest.mark.slow
def test_diverging_loss_stops_with_one_line(home):
    # lr 1e4 diverged to NaN on one machine and only to a uniform model (loss 4.6) on another: an
    # absurd rate overflows the weights everywhere.
    result = rlhf("sft", *ONE_PROCESS, "-c", str(REPO / "configs" / "sft-toy-quick.yaml"), "optim.lr=1e30", "optim.grad_clip=0",
                  "optim.warmup_steps=0", "data.eval=null", "eval.max_rows=16", home=home)
    assert result.code == 2 and "Traceback" not in result.output
    assert "error: the training loss became nan at step" in result.stderr
    assert not list(home.glob("entries/*.json"))


def test_resume_with_nothing_to_resume(home):
    assert_user_error(rlhf_here("sft", "--resume", home=home), "no unfinished sft run")


@pytest.mark.slow
def test_stage_program_started_directly_reports_errors_the_same_way(home):
    """Without the CLI's checks, the stage program itself turns a data mistake into one line."""
    data = write_jsonl(home / "train.jsonl", [GOOD, ["not", "an", "object"]])
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf.stages.sft", "--config", str(REPO / "configs" / "sft-toy-quick.yaml"),
         f"data.train={data}", "data.eval=null"],
        env={**cli_env(home), "OMP_NUM_THREADS": "1"}, cwd=home, capture_output=True, text=True, timeout=300,
    )
    assert_user_error(Result(proc.returncode, proc.stdout, proc.stderr), "train.jsonl:2")
    # The run folder exists (the program made it) but nothing was published.
    assert not list(home.glob("entries/*.json"))
