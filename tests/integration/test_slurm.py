"""`rlhf submit` on a real one-node SLURM cluster (scripts/slurm-local.sh), jobs of 2 CPU ranks each.

A running cluster (or one the script configured before) is used as it is. Installing slurm-wlm and
munge and writing /etc/slurm and /etc/munge happen only as root on CI (CI=true) or with
RLHF_TEST_SLURM_SETUP=1, and are reported in one line; without a cluster to use or that permission
the tests skip, saying why and how to opt in (tests/slurm_setup.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from tests.integration.conftest import PPO_QUICK, QUICK, REPO, RM_QUICK, assert_ok, entries, metric_rows, rlhf
from tests.slurm_setup import announce, changes_line, may_set_up, skip_reason, start_command

pytestmark = pytest.mark.slow

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
CPU_JOB = ("--ranks-per-node", "2", "--cpus-per-task", "2")


@pytest.fixture(scope="session")
def slurm(request) -> None:
    set_up = may_set_up(os.environ, root=os.geteuid() == 0)
    started = subprocess.run(start_command(REPO / "scripts" / "slurm-local.sh", set_up=set_up), capture_output=True,
                             text=True, timeout=900)
    # Said before any skip or failure: what it installed stays installed.
    if (line := changes_line(started.stdout, os.environ)) is not None:
        announce(request.config, line)
    if started.returncode == 3:
        pytest.skip(skip_reason(started.stderr.strip(), set_up=set_up))
    assert started.returncode == 0, started.stdout + started.stderr


def submitted(result) -> dict[str, tuple[str, str]]:
    """{stage: (job id, run id)} from `rlhf submit`'s output."""
    assert_ok(result)
    found = re.findall(r"submitted (\w+): job (\d+), run (\S+),", result.stdout)
    assert found, result.output
    return {stage: (job, run) for stage, job, run in found}


def job_fields(job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)


def wait_for(job_ids: list[str], timeout: float = 600) -> dict[str, dict[str, str]]:
    """Poll until every job reached a final state (`sbatch --wait` returns 0 even for a job cancelled
    because its parent failed, so the state is read instead)."""
    deadline = time.time() + timeout
    while True:
        jobs = {job_id: job_fields(job_id) for job_id in job_ids}
        if all(fields["JobState"] in FINAL_STATES for fields in jobs.values()):
            return jobs
        assert time.time() < deadline, {j: f["JobState"] for j, f in jobs.items()}
        time.sleep(1)


# Three jobs of two ranks each, one after another: `make test-full` (the requeue below is CI's real job).
@pytest.mark.full
def test_pipeline_runs_as_three_chained_jobs(slurm, tmp_path):
    home = tmp_path / "home"
    result = rlhf("submit", "pipeline", "--sft-config", QUICK, "--rm-config", RM_QUICK, "--ppo-config", PPO_QUICK,
                  *CPU_JOB, "sft:train.max_steps=40", "rm:train.max_steps=40", "ppo:train.max_steps=2", home=home)
    jobs = submitted(result)
    assert list(jobs) == ["sft", "rm", "ppo"]
    # The later jobs wait for the earlier ones (afterok), so their references resolve at start.
    assert job_fields(jobs["rm"][0])["Dependency"].startswith(f"afterok:{jobs['sft'][0]}")
    assert job_fields(jobs["ppo"][0])["Dependency"].startswith(f"afterok:{jobs['rm'][0]}")

    states = wait_for([job for job, _ in jobs.values()])
    logs = {stage: (home / "runs" / run / f"slurm-{job}.out") for stage, (job, run) in jobs.items()}
    for stage, (job, _) in jobs.items():
        assert states[job]["JobState"] == "COMPLETED", (stage, logs[stage].read_text()[-3000:])
        assert "2 rank(s)" in logs[stage].read_text()
    assert states[jobs["rm"][0]]["StartTime"] >= states[jobs["sft"][0]]["EndTime"]
    assert states[jobs["ppo"][0]]["StartTime"] >= states[jobs["rm"][0]]["EndTime"]

    by_stage = {e["stage"]: e for e in entries(home)}
    assert {stage: by_stage[stage]["id"] for stage in jobs} == {stage: run for stage, (_, run) in jobs.items()}
    assert by_stage["rm"]["parents"] == [by_stage["sft"]["id"]]
    assert by_stage["ppo"]["parents"] == [by_stage["sft"]["id"], by_stage["rm"]["id"]]
    assert by_stage["critic"]["parents"] == [by_stage["rm"]["id"]]


# Nine jobs of one rank, one after another (sft, then two rounds of sample, label, rm, ppo): `make test-full`.
@pytest.mark.full
def test_feedback_rounds_run_as_chained_jobs_each_round_on_the_last_ones_policy(slurm, tmp_path):
    home = tmp_path / "home"
    result = rlhf("submit", "pipeline", "--rounds", "2", "--label-by", "oracle", "--ranks-per-node", "1", "--cpus-per-task", "2",
                  "--sft-config", QUICK, "--rm-config", RM_QUICK, "--ppo-config", PPO_QUICK,
                  "sft:train.max_steps=30", "sft:optim.warmup_steps=1", "sft:eval.max_rows=8",
                  "sample:data.max_prompts=16", "sample:sampling.shard_prompts=16",
                  "rm:train.max_steps=4", "rm:optim.warmup_steps=1", "rm:engine.micro_batch_size=2", "rm:eval.max_rows=8",
                  "rm:eval.reward_stats_rows=8", "ppo:train.max_steps=1", "ppo:eval.max_rows=8", home=home)
    assert_ok(result)
    found = re.findall(r"submitted (\w+): job (\d+), run (\S+),", result.stdout)
    assert [stage for stage, _, _ in found] == ["sft", *["sample", "label", "rm", "ppo"] * 2], result.stdout
    jobs = [job for _, job, _ in found]
    for before, after in zip(jobs, jobs[1:]):  # each job waits for the one before it
        assert job_fields(after)["Dependency"].startswith(f"afterok:{before}")
    states = wait_for(jobs, timeout=1200)
    for stage, job, run in found:
        log = next((home / "runs").glob(f"*/slurm-{job}.out"), None)
        assert states[job]["JobState"] == "COMPLETED", (stage, run, log.read_text()[-3000:] if log else "no log")

    made = {e["id"]: e for e in entries(home)}
    ids = [run for _, _, run in found]
    sft, (s1, l1, r1, p1), (s2, l2, r2, p2) = ids[0], ids[1:5], ids[5:9]
    assert made[s1]["parents"] == [sft] and made[s2]["parents"] == [p1]  # round 2 samples round 1's PPO policy
    assert set(made[l2]["parents"]) == {s2, l1}  # round 2's labels keep round 1's comparisons
    assert set(made[r2]["parents"]) == {sft, l2} and made[r1]["stage"] == made[r2]["stage"] == "rm"
    assert {sft, r2} <= set(made[p2]["parents"]) and made[p2]["stage"] == "ppo"


def test_requeued_job_resumes_from_its_checkpoint(slurm, tmp_path):
    home = tmp_path / "home"
    # Long enough that the requeue's SIGTERM lands mid-run: 300 steps took 16 s here, less than the
    # requeue took to arrive after the first checkpoint.
    result = rlhf("submit", "sft", "--requeue", "-c", QUICK, *CPU_JOB, "train.max_steps=1500", "train.save_every=50",
                  "train.eval_every=0", "data.eval=null", home=home)
    [(job, run)] = submitted(result).values()
    run_dir = home / "runs" / run
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "resume.json").exists():
        assert time.time() < deadline and job_fields(job)["JobState"] in ("PENDING", "RUNNING"), job_fields(job)
        time.sleep(0.2)
    # What SLURM does on preemption: SIGTERM to every process of the job, then it runs it again.
    subprocess.run(["scontrol", "requeue", job], check=True)
    # SLURM holds a requeued job back for a while (BeginTime); the operator lets it start now.
    deadline = time.time() + 120
    while job_fields(job)["JobState"] != "PENDING":
        assert time.time() < deadline, job_fields(job)
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], check=True)

    state = wait_for([job])[job]
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-3000:]
    stopped = re.search(r"SIGTERM: stopped after step (\d+) with a checkpoint", log)
    resumed = re.search(r"resumed \S+ at step (\d+)", log)
    assert stopped and resumed, log[-3000:]
    # It resumed where the signal stopped it, not at the last periodic checkpoint nor at zero.
    assert int(resumed.group(1)) == int(stopped.group(1)) > 50
    assert "(restart 1)" in log
    [entry] = entries(home)
    assert entry["id"] == run and entry["metrics"]["steps"] == 1500
    steps = [row["step"] for row in metric_rows(entry) if "loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == 1500  # one curve, no step logged twice


def test_reference_that_does_not_resolve_when_the_job_starts(slurm, tmp_path):
    home = tmp_path / "home"
    result = rlhf("submit", "rm", "-c", RM_QUICK, *CPU_JOB, "model.name_or_path=sft:nosuchrun", home=home)
    [(job, run)] = submitted(result).values()  # not checked at submission: the parent may still be training
    state = wait_for([job])[job]
    log = (home / "runs" / run / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "FAILED", log
    assert "error: model.name_or_path=sft:nosuchrun: unknown registry reference 'sft:nosuchrun'" in log
    assert "Traceback" not in log


def test_unknown_partition_shows_sbatchs_error(slurm, tmp_path):
    home = tmp_path / "home"
    result = rlhf("submit", "pipeline", "--partition", "nosuchpartition", home=home)
    assert result.code == 2
    assert "sbatch refused" in result.stderr and "invalid partition" in result.stderr.lower(), result.output
    assert "Traceback" not in result.output
    assert not (home / "runs").exists() or not list((home / "runs").iterdir())  # nothing left behind


def test_quoted_directive_reaches_slurm_as_one_literal_value(slurm, tmp_path):
    # What the unit tests model of sbatch's #SBATCH reader (quotes, a backslash inside them, `#`), checked
    # against the real one: the job is held, its comment read back, then cancelled before it runs.
    home = tmp_path / "home"
    comment = "a b 'c' \"d\" #e \\f $(g)"
    result = rlhf("submit", "sft", *CPU_JOB, "--sbatch-arg=--hold", f"--sbatch-arg=--comment={comment}", home=home)
    [(job, _)] = submitted(result).values()
    try:
        shown = subprocess.run(["squeue", "-h", "-j", job, "-o", "%k"], capture_output=True, text=True, check=True)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    assert shown.stdout.rstrip("\n") == comment


def test_submit_without_sbatch_on_path(tmp_path):
    home = tmp_path / "home"
    no_slurm = {"PATH": str(tmp_path / "empty")}
    result = rlhf("submit", "sft", home=home, env=no_slurm)
    assert result.code == 2 and "sbatch not found on PATH" in result.stderr, result.output
    # --dry-run needs no SLURM: it prints the script and makes nothing.
    dry = rlhf("submit", "sft", "--dry-run", home=home, env=no_slurm)
    assert_ok(dry)
    assert "#SBATCH --job-name=rlhf-sft" in dry.stdout and not (home / "runs").exists()


def test_config_mistake_is_caught_at_submission(tmp_path):
    home = tmp_path / "home"
    result = rlhf("submit", "pipeline", "rm:optim.nosuchkey=1", "--dry-run", home=home)
    assert result.code == 2 and "optim.nosuchkey" in result.stderr and "Traceback" not in result.output
    assert not (home / "runs").exists()
