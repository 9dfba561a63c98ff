"""sbatch scripts and the srun launch command (the scripts run on a real SLURM in tests/integration)."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest

from rlhf.errors import UserError
from rlhf.launch import LaunchSpec, build_command, srun_command
from rlhf.slurm import Resources, StageJob, render_script, stage_jobs


def ids():
    """A stand-in for Registry.new_run_id: distinct, predictable ids."""
    counter = itertools.count(1)
    return lambda stage: f"{stage}-run{next(counter)}"


def test_pipeline_jobs_point_each_stage_at_the_runs_before_it(tmp_path):
    jobs = stage_jobs(("sft", "rm", "ppo"), registry_root=tmp_path, new_run_id=ids(),
                      stage_args={"sft": ["train.max_steps=3"], "rm": [], "ppo": ["critic.name_or_path=rm:mine"]})
    sft, rm, ppo = jobs
    assert sft.stage_args == ("train.max_steps=3",)
    assert rm.stage_args == (f"model.name_or_path=sft:{sft.run_id}",)
    # What the user set wins; the rest follows the chain.
    assert ppo.stage_args == ("critic.name_or_path=rm:mine", f"model.name_or_path=sft:{sft.run_id}",
                              f"reward.name_or_path=rm:{rm.run_id}")
    assert rm.run_dir == tmp_path / "runs" / rm.run_id and rm.script_path.name == "job.sbatch"


def test_script_directives_and_resume_branch(tmp_path):
    job = StageJob("rm", "rm-abc", tmp_path / "runs" / "rm-abc", ("-c", "/cfg/rm.yaml", "optim.lr=1e-4"))
    res = Resources(nodes=2, gpus_per_node=8, partition="gpu", time="04:00:00", account="proj", requeue=True,
                    warn_before_s=300, sbatch_args=("--qos=high",))
    script = render_script(job, res, registry_root=tmp_path, workdir=Path("/work dir"), rlhf_exe="/venv/bin/rlhf",
                           python="/venv/bin/python")
    directives = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "--job-name=rlhf-rm", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
        "--time=04:00:00", "--account=proj", f"--output={tmp_path}/runs/rm-abc/slurm-%j.out", "--open-mode=append",
        "--requeue", "--signal=B:USR1@300", "--qos=high",
    ]
    assert "cd '/work dir'" in script
    assert "--launcher srun -n 8 --resume --run \"$RUN_ID\"" in script
    assert "--launcher srun -n 8 --run \"$RUN_ID\" -c /cfg/rm.yaml optim.lr=1e-4" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    # The script is valid bash.
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_cpu_job_without_requeue_asks_for_no_gpu():
    job = StageJob("sft", "sft-1", Path("/r/runs/sft-1"), ())
    script = render_script(job, Resources(ranks_per_node=2, cpus_per_task=2), registry_root=Path("/r"),
                           workdir=Path("/w"), rlhf_exe="rlhf")
    assert "--gpus-per-node" not in script and "#SBATCH --cpus-per-task=2" in script
    assert "#SBATCH --no-requeue" in script and "--signal" not in script
    assert "--launcher srun -n 2 --run \"$RUN_ID\"\n" in script


@pytest.mark.parametrize("res, message", [
    (Resources(nodes=0), "--nodes must be at least 1"),
    (Resources(gpus_per_node=-1), "--gpus-per-node must be 0"),
    (Resources(gpus_per_node=2, ranks_per_node=4), "each rank needs a GPU"),
])
def test_impossible_resources(res, message):
    with pytest.raises(UserError, match=message):
        res.check()


SLURM_ENV = {"SLURM_JOB_ID": "77", "SLURM_NNODES": "3", "MASTER_ADDR": "node01", "MASTER_PORT": "29555"}


def test_srun_starts_one_torchrun_per_node_with_a_rendezvous_on_the_first():
    cmd = srun_command(LaunchSpec(Path("stages/ppo.py"), ("--run-dir", "/r"), num_procs=4), python="py", env=SLURM_ENV)
    assert cmd[:4] == ["srun", "--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert cmd[4:7] == ["py", "-m", "torch.distributed.run"]
    assert {"--nnodes=3", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node01:29555",
            "--rdzv-id=77"} <= set(cmd)
    assert cmd[-3:] == ["stages/ppo.py", "--run-dir", "/r"]


def test_srun_outside_a_job_says_to_submit(monkeypatch):
    for name in SLURM_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="rlhf submit"):
        build_command(LaunchSpec(Path("p.py"), (), launcher="srun"))
