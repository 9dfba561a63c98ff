"""`rlhf submit`: sbatch scripts for a stage or the whole pipeline, submitted and chained.

Each job runs the same `rlhf <stage>` command a user would type, inside the allocation: the CLI
resolves parent references (`sft:latest`, `rm:<id>`) and checks inputs when the job starts, not
when it is submitted, then starts the ranks with `--launcher srun` (one torchrun per node, meeting
at a rendezvous on the allocation's first node). Run ids are chosen at submission so that each
job's log is written into its run folder from the first line, and so that a requeued job finds
its run and resumes it from the last checkpoint.

Standard library only: `rlhf submit --dry-run` must answer at once on a login node.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rlhf.errors import UserError, first_line

PIPELINE = ("sft", "rm", "ppo")

# Which config keys of a later stage name an earlier stage's entry, so a submitted pipeline ties
# each job to the exact runs it chained after (a `latest` could pick up someone else's run).
PARENT_KEYS = {
    "rm": {"model.name_or_path": "sft"},
    "ppo": {"model.name_or_path": "sft", "critic.name_or_path": "rm", "reward.name_or_path": "rm"},
}

JOB_SCRIPT = "job.sbatch"


@dataclass(frozen=True)
class Resources:
    """What each job asks SLURM for; None leaves the cluster's default."""

    nodes: int = 1
    gpus_per_node: int = 0
    ranks_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    requeue: bool = False
    warn_before_s: int = 120
    sbatch_args: tuple[str, ...] = ()

    @property
    def ranks(self) -> int:
        """Ranks per node: one per GPU unless said otherwise (one on a CPU-only node)."""
        return self.ranks_per_node or max(self.gpus_per_node, 1)

    def check(self) -> None:
        if self.nodes < 1:
            raise UserError(f"--nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise UserError(f"--gpus-per-node must be 0 (CPU) or more, got {self.gpus_per_node}")
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise UserError(f"--ranks-per-node must be at least 1, got {self.ranks_per_node}")
        if self.gpus_per_node and self.ranks_per_node and self.ranks_per_node > self.gpus_per_node:
            raise UserError(
                f"--ranks-per-node {self.ranks_per_node} is more than --gpus-per-node {self.gpus_per_node}: "
                "each rank needs a GPU of its own"
            )


@dataclass(frozen=True)
class StageJob:
    """One stage's job: the run it will create (or resume) and the `rlhf <stage>` arguments."""

    stage: str
    run_id: str
    run_dir: Path
    stage_args: tuple[str, ...]

    @property
    def script_path(self) -> Path:
        return self.run_dir / JOB_SCRIPT

    @property
    def log_pattern(self) -> Path:
        return self.run_dir / "slurm-%j.out"


def render_script(job: StageJob, res: Resources, *, registry_root: Path, workdir: Path,
                  rlhf_exe: str, python: str = sys.executable, command_line: str = "") -> str:
    """The sbatch script of one stage job (bash)."""
    q = shlex.quote
    directives = [
        f"--job-name=rlhf-{job.stage}",
        f"--nodes={res.nodes}",
        "--ntasks-per-node=1",  # one launcher per node; it starts that node's ranks
    ]
    if res.gpus_per_node:
        directives.append(f"--gpus-per-node={res.gpus_per_node}")
    if res.cpus_per_task:
        directives.append(f"--cpus-per-task={res.cpus_per_task}")
    for flag, value in (("partition", res.partition), ("time", res.time), ("account", res.account)):
        if value:
            directives.append(f"--{flag}={value}")
    directives += [f"--output={job.log_pattern}", "--open-mode=append"]  # a requeued job appends
    if res.requeue:
        # SIGUSR1 to this script shortly before the time limit: it asks SLURM to requeue the job,
        # which SIGTERMs the ranks (they save a checkpoint) and starts the job again later.
        directives += ["--requeue", f"--signal=B:USR1@{res.warn_before_s}"]
    else:
        directives.append("--no-requeue")
    directives += list(res.sbatch_args)

    stage_cmd = " ".join(q(a) for a in job.stage_args)
    launch = f"--launcher srun -n {res.ranks}"
    lines = [
        "#!/bin/bash",
        *[f"#SBATCH {d}" for d in directives],
        f"# Rendered by `{command_line or 'rlhf submit'}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "# References to other runs resolve when this job starts; a requeued job resumes its run.",
        "set -uo pipefail",
        f"cd {q(str(workdir))}",
        f"export RLHF_HOME={q(str(registry_root))}",
        f"RUN_ID={q(job.run_id)}",
        "",
        "# Rendezvous on the first node of the allocation, on a port free there.",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"export MASTER_PORT=\"$({q(python)} -c 'import socket; s = socket.socket(); s.bind((\"\", 0)); "
        "print(s.getsockname()[1])')\"",
        "# NCCL: a failed rank ends the job instead of leaving the others waiting; set",
        "# NCCL_SOCKET_IFNAME / NCCL_IB_HCA in the submitting shell if your fabric needs them.",
        'export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"',
        'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
        'export COLUMNS="${COLUMNS:-160}"  # rich wraps log lines at 80 columns off a terminal',
        "",
        'echo "rlhf: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, run $RUN_ID"',
        'if [ -f "$RLHF_HOME/runs/$RUN_ID/config.yaml" ]; then',
        f'  set -- {q(rlhf_exe)} {job.stage} {launch} --resume --run "$RUN_ID" --registry "$RLHF_HOME"',
        "else",
        f'  set -- {q(rlhf_exe)} {job.stage} {launch} --run "$RUN_ID" {stage_cmd}'.rstrip(),
        "fi",
        "trap 'echo \"rlhf: time limit near: requeueing job $SLURM_JOB_ID\"; scontrol requeue \"$SLURM_JOB_ID\"' USR1",
        '"$@" &',
        "stage_pid=$!",
        "# `wait` returns early when a trapped signal arrives; keep waiting until the stage ends.",
        "while true; do",
        '  wait "$stage_pid"; status=$?',
        '  kill -0 "$stage_pid" 2>/dev/null || exit "$status"',
        "done",
        "",
    ]
    return "\n".join(lines)


def stage_jobs(stages: tuple[str, ...], *, registry_root: Path, new_run_id, stage_args: dict[str, list[str]]) -> list[StageJob]:
    """One job per stage, later stages pointed at the earlier jobs' runs (unless the user set them)."""
    jobs: list[StageJob] = []
    run_ids: dict[str, str] = {}
    for stage in stages:
        run_id = new_run_id(stage)
        args = list(stage_args.get(stage, []))
        given = {a.split("=", 1)[0] for a in args if "=" in a and not a.startswith("-")}
        for key, parent in PARENT_KEYS.get(stage, {}).items():
            if parent in run_ids and key not in given:
                args.append(f"{key}={parent}:{run_ids[parent]}")
        run_ids[stage] = run_id
        jobs.append(StageJob(stage, run_id, registry_root / "runs" / run_id, tuple(args)))
    return jobs


def sbatch_path() -> str:
    found = shutil.which("sbatch")
    if found is None:
        raise UserError(
            "sbatch not found on PATH: run `rlhf submit` on a SLURM login node (or load the slurm "
            "module), or add --dry-run to print the scripts"
        )
    return found


def submit_script(script: Path, *, sbatch: str, after: str | None = None) -> str:
    """Submit one script and return its job id; `after` chains it with --dependency=afterok."""
    cmd = [sbatch, "--parsable"]
    if after:
        cmd.append(f"--dependency=afterok:{after}")
    proc = subprocess.run([*cmd, str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        said = first_line(RuntimeError(proc.stderr or proc.stdout or f"exit status {proc.returncode}"), 300)
        raise UserError(f"sbatch refused {script}: {said}")
    # --parsable prints "jobid" or "jobid;cluster".
    return proc.stdout.strip().split(";")[0]
