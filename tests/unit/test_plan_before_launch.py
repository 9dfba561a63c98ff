"""The memory check before a stage launches (rlhf.launcher.memory_check): `rlhf plan`'s estimate for the run's ranks against
the device memory, a yellow warning on stderr when it may not fit, nothing when it fits or is switched off, and never
an error. On the CPU the device memory comes from RLHF_PLAN_MEMORY, as on a machine that sets it; dry runs only."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.config import SFTConfig, load_config
from rlhf.launcher.memory_check import PLAN_MEMORY_ENV, check_plan, world_size
from rlhf.launcher.memory_estimates import human


@pytest.fixture
def rlhf(tmp_path, monkeypatch):
    """`rlhf ARGS` in this process, with RLHF_PLAN_MEMORY set to `memory` (None: unset)."""
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    monkeypatch.delenv(PLAN_MEMORY_ENV, raising=False)

    def run(*args: str, memory: str | None):
        return CliRunner().invoke(app, list(args), env={PLAN_MEMORY_ENV: memory})

    return run


def test_a_run_over_the_memory_is_warned_with_the_plan_s_change_and_still_launches(rlhf):
    args = ["-c", "sft-toy-quick", "engine.zero_stage=3"]
    result = rlhf("sft", "-n", "2", "--dry-run", *args, memory="1MiB")
    assert result.exit_code == 0, result.output
    # The same estimate and change as `rlhf plan` over the run's 2 ranks.
    planned = json.loads(rlhf("plan", "sft", *args, "--ranks", "2", "--memory", "1MiB", "--json", memory=None).stdout)
    assert planned["fits"] is False and planned["suggestion"]
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning: plan:")]
    assert warning.startswith(f"warning: plan: ~{human(planned['total_bytes'])} per rank of 1 MiB (2 ranks): may not fit; ")
    assert f"try {planned['suggestion']} (`rlhf plan sft -c " in warning
    assert warning.endswith("sft-toy-quick.yaml engine.zero_stage=3 --ranks 2 --memory 1MiB` for details)")
    # The warning is on stderr: the dry run's stdout is still the config and the command.
    assert yaml.safe_load(result.stdout.split("\nDS_ACCELERATOR")[0])["engine"]["zero_stage"] == 3
    assert "--module rlhf.stages.sft" in result.stdout


def test_no_warning_when_it_fits_or_when_switched_off(rlhf):
    fits = rlhf("sft", "--dry-run", "-v", memory="80GiB")
    assert fits.exit_code == 0, fits.output
    assert "warning" not in fits.stderr
    assert "per rank of 80 GiB (1 rank): fits" in fits.stderr  # said only under -v
    off = rlhf("sft", "--dry-run", "-v", memory="off")
    assert off.exit_code == 0, off.output
    assert "warning" not in off.stderr and "RLHF_PLAN_MEMORY=off: no memory check" in off.stderr
    quiet = rlhf("sft", "--dry-run", memory="80GiB")
    assert quiet.exit_code == 0 and "plan:" not in quiet.output


def test_a_failed_parameter_count_launches_without_a_word_but_under_v(rlhf, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no such architecture")

    monkeypatch.setattr("rlhf.launcher.memory_shapes.model_shapes", broken)
    for verbose in ([], ["-v"]):
        result = rlhf("sft", "--dry-run", *verbose, memory="1MiB")
        assert result.exit_code == 0, result.output
        assert "warning" not in result.stderr and "--module rlhf.stages.sft" in result.stdout
        assert ("plan: no memory estimate (RuntimeError: no such architecture)" in result.stderr) == bool(verbose)


def test_a_bad_memory_setting_is_a_warning_not_an_error(rlhf):
    result = rlhf("sft", "--dry-run", memory="12XB")
    assert result.exit_code == 0, result.output
    assert "warning: plan: RLHF_PLAN_MEMORY '12XB' is not a memory size" in result.stderr


def test_a_hub_name_is_read_from_the_local_cache_only(monkeypatch):
    import transformers

    asked = []

    def from_pretrained(source, **kwargs):
        asked.append((source, kwargs))
        raise OSError("not in the local cache")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    cfg = load_config(SFTConfig, None, ["model.name_or_path=some-org/not-cached"])
    check = check_plan("sft", cfg, ranks=1, per_node=1, plan_args=[], env={PLAN_MEMORY_ENV: "1MiB"})
    assert asked == [("some-org/not-cached", {"trust_remote_code": False, "local_files_only": True})]
    assert check.warning is None and check.detail.startswith("plan: no memory estimate (UserError: model.name_or_path=some-org")


def test_stages_plan_does_not_estimate_and_machines_without_cuda_are_not_checked():
    cfg = load_config(SFTConfig, None, [])
    assert check_plan("sample", cfg, ranks=1, per_node=1, plan_args=[], env={PLAN_MEMORY_ENV: "1MiB"}).warning is None
    unset = check_plan("sft", cfg, ranks=1, per_node=1, plan_args=[], env={})
    assert unset.warning is None
    import torch

    if not torch.cuda.is_available():
        assert "no CUDA device" in unset.detail


def test_ranks_are_per_node_times_the_nodes(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=8\n\nnode-b slots=8  # the second\n")
    assert world_size(4, launcher="deepspeed", hostfile=None, env={}) == 4
    assert world_size(4, launcher="deepspeed", hostfile=hostfile, env={}) == 8
    assert world_size(8, launcher="srun", hostfile=None, env={"SLURM_NNODES": "3"}) == 24
    assert world_size(8, launcher="srun", hostfile=None, env={}) == 8
