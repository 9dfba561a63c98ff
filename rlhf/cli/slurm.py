"""`rlhf submit`: sbatch scripts for a stage or the whole pipeline, submitted and chained.

Each job runs the same `rlhf <stage>` command a user would type, inside the allocation: the CLI
resolves parent references (`sft:latest`, `rm:<id>`) and checks inputs when the job starts, not
when it is submitted, then starts the ranks with `--launcher srun` (one torchrun per node, meeting
at a rendezvous on the allocation's first node). Run ids are chosen at submission so that each
job's log is written into its run folder from the first line, and so that a requeued job finds
its run and resumes it from the last checkpoint.

Every value that goes into a script is data, never code: a control character (a newline could
end a `#SBATCH` line or a shell line and start a command) is refused before anything is written,
and each value is quoted, for bash and for sbatch's own reading of the `#SBATCH` lines.

Standard library only: `rlhf submit --dry-run` must answer at once on a login node.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rlhf.cli.chaining import with_parents
from rlhf.errors import UserError, first_line
from rlhf.store.entry import is_entry_id, is_stage_name

JOB_SCRIPT = "job.sbatch"

# Characters that end a line (or hide the rest of it) in bash or in sbatch's `#SBATCH` reader.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# sbatch takes an `#SBATCH` line holding either word for the start of another job component.
_HETJOB_RE = re.compile(r"hetjob|packjob", re.IGNORECASE)


def check_script_value(what: str, value: str) -> str:
    """`value` unchanged; a UserError (naming `what`, the option) if it holds a control character,
    which no quoting keeps from ending a `#SBATCH` line and running the rest as a command."""
    bad = _CONTROL_RE.search(value)
    if bad:
        raise UserError(
            f"{what} {value!r} contains the control character {bad.group()!r}, which a job script cannot "
            f"hold safely; remove it (no newlines, tabs or other control characters)"
        )
    return value


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
        self._check_counts()
        for flag, value in (("--partition", self.partition), ("--time", self.time), ("--account", self.account)):
            if value is not None:
                check_script_value(flag, value)
        for arg in self.sbatch_args:
            check_script_value("--sbatch-arg", arg)
            if not arg.startswith("-"):  # a bare word is a separate job component or a script name to sbatch
                raise UserError(
                    f"--sbatch-arg {arg!r} is not an sbatch option; give one option each, e.g. --sbatch-arg=--qos=high"
                )

    def _check_counts(self) -> None:
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
    resume_args: tuple[str, ...] = ()
    """The code-running settings the submitting user gave (rlhf.store.trust), repeated when a requeue resumes."""

    @property
    def script_path(self) -> Path:
        return self.run_dir / JOB_SCRIPT

    def check(self) -> None:
        """Refuse a stage or run id that is not a plain name, and control characters in the arguments."""
        if not is_stage_name(self.stage):
            raise UserError(f"stage {self.stage!r} is not a stage name (a lowercase word such as sft)")
        if not is_entry_id(self.run_id):
            raise UserError(
                f"run id {self.run_id!r} of the {self.stage} job is not a plain name (letters, digits, '.', '_', '-')"
            )
        check_script_value(f"the log file of the {self.stage} job", str(self.log_pattern))
        for arg in (*self.stage_args, *self.resume_args):
            check_script_value(f"argument of `rlhf {self.stage}`", arg)

    @property
    def log_pattern(self) -> Path:
        return self.run_dir / "slurm-%j.out"


def render_script(job: StageJob, res: Resources, *, registry_root: Path, workdir: Path,
                  rlhf_exe: str, python: str = sys.executable, command_line: str = "") -> str:
    """The sbatch script of one stage job (bash); UserError for a value it cannot hold safely."""
    res.check()
    job.check()
    for what, value in (("the working directory", str(workdir)), ("the registry root", str(registry_root)),
                        ("the rlhf executable", rlhf_exe), ("the python executable", python),
                        ("the command line", command_line)):
        check_script_value(what, value)
    q = shlex.quote
    return "\n".join([
        "#!/bin/bash",
        *[_sbatch_line(arg) for arg in _directives(job, res)],
        # No control character in it (checked above), so the comment cannot end early.
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
        *_run_lines(job, res, rlhf_exe),
        "",
    ])


def _directives(job: StageJob, res: Resources) -> list[str]:
    """The sbatch options of the job, one argument each (unquoted)."""
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
    return directives + list(res.sbatch_args)


def _sbatch_line(arg: str) -> str:
    """`#SBATCH <arg>` that sbatch reads back as exactly `arg`, one argument.

    sbatch's script reader splits at blanks and takes quotes as a shell does, but it also takes a
    backslash as an escape inside quotes, and an unquoted `#` as the start of a comment: so
    shlex.quote (which quotes `#` and blanks), then every backslash doubled.
    """
    if _HETJOB_RE.search(arg):
        raise UserError(
            f"sbatch option {arg!r} contains 'hetjob' or 'packjob', which sbatch reads in a script as the "
            f"start of another job component; choose another name"
        )
    return "#SBATCH " + shlex.quote(arg).replace("\\", "\\\\")


def _run_lines(job: StageJob, res: Resources, rlhf_exe: str) -> list[str]:
    """Start `rlhf <stage>` (or resume its run) in the background and wait for it through signals."""
    q = shlex.quote
    start = f"{q(rlhf_exe)} {q(job.stage)} --launcher srun -n {res.ranks}"
    return [
        'if [ -f "$RLHF_HOME/runs/$RUN_ID/config.yaml" ]; then',
        f'  set -- {start} --resume --run "$RUN_ID" --registry "$RLHF_HOME" {shlex.join(job.resume_args)}'.rstrip(),
        "else",
        f'  set -- {start} --run "$RUN_ID" {shlex.join(job.stage_args)}'.rstrip(),
        "fi",
        "trap 'echo \"rlhf: time limit near: requeueing job $SLURM_JOB_ID\"; scontrol requeue \"$SLURM_JOB_ID\"' USR1",
        '"$@" &',
        "stage_pid=$!",
        "# `wait` returns early when a trapped signal arrives; keep waiting until the stage ends.",
        "while true; do",
        '  wait "$stage_pid"; status=$?',
        '  kill -0 "$stage_pid" 2>/dev/null || exit "$status"',
        "done",
    ]


def stage_jobs(stages: tuple[str, ...], *, registry_root: Path, new_run_id, stage_args: dict[str, list[str]],
               resume_args: dict[str, list[str]] | None = None) -> list[StageJob]:
    """One job per stage, later stages pointed at the earlier jobs' runs (unless the user set them)."""
    jobs: list[StageJob] = []
    run_ids: dict[str, str] = {}
    for stage in stages:
        run_id = new_run_id(stage)
        args = with_parents(stage, list(stage_args.get(stage, [])), run_ids)
        run_ids[stage] = run_id
        jobs.append(StageJob(stage, run_id, registry_root / "runs" / run_id, tuple(args), tuple((resume_args or {}).get(stage, ()))))
    return jobs


def round_jobs(rounds: int, label_by: str, *, registry_root: Path, new_run_id, stage_args: dict[str, list[str]],
               resume_args: dict[str, list[str]] | None = None) -> list[StageJob]:
    """`rlhf pipeline --rounds` as jobs: sft, then each round's sample, label, rm and ppo, every job pointed at
    the runs before it by the ids chosen here (rlhf.cli.chaining.round_overrides)."""
    from rlhf.cli.chaining import ROUND_STAGES, round_overrides

    sft_id = new_run_id("sft")
    jobs = [StageJob("sft", sft_id, registry_root / "runs" / sft_id, tuple(stage_args.get("sft", [])),
                     tuple((resume_args or {}).get("sft", ())))]
    previous: dict[str, str] = {}
    for _ in range(rounds):
        current: dict[str, str] = {}
        for stage in ROUND_STAGES:
            run_id = new_run_id(stage)
            args = round_overrides(stage, list(stage_args.get(stage, [])), sft=sft_id, previous=previous, current=current,
                                   label_by=label_by)
            current[stage] = run_id
            jobs.append(StageJob(stage, run_id, registry_root / "runs" / run_id, tuple(args), tuple((resume_args or {}).get(stage, ()))))
        previous = current
    return jobs


def sbatch_path() -> str:
    found = shutil.which("sbatch")
    if found is None:
        raise UserError(
            "sbatch not found on PATH: run `rlhf submit` on a SLURM login node (or load the slurm "
            "module), or add --dry-run to print the scripts"
        )
    return found


def sbatch_command(script: Path, *, sbatch: str = "sbatch", after: str | None = None) -> list[str]:
    """The argv that submits `script`; `after` (a job id, or a placeholder in a dry run) chains it
    with --dependency=afterok. What `submit_script` runs and what `--dry-run` prints, so they agree."""
    cmd = [sbatch, "--parsable"]
    if after:
        cmd.append(f"--dependency=afterok:{after}")
    return [*cmd, str(script)]


def dry_run_listing(jobs: list[StageJob], scripts: dict[str, str], *, sbatch: str = "sbatch") -> str:
    """Each job's script, then the sbatch commands that would submit them in order; the id of a job
    not yet submitted is a placeholder, `<job id of STAGE>`."""
    parts = [f"# ---- {job.script_path} ----\n{scripts[job.run_id]}" for job in jobs]
    parts.append("# ---- sbatch commands, in this order (each prints the job id that the next one waits for) ----")
    before = [None, *jobs[:-1]]
    parts += [shlex.join(sbatch_command(job.script_path, sbatch=sbatch, after=None if prev is None else f"<job id of {prev.stage}>"))
              for prev, job in zip(before, jobs)]
    return "\n".join(parts)


def submit_script(script: Path, *, sbatch: str, after: str | None = None) -> str:
    """Submit one script and return its job id; `after` chains it with --dependency=afterok."""
    proc = subprocess.run(sbatch_command(script, sbatch=sbatch, after=after), capture_output=True, text=True)
    if proc.returncode != 0:
        said = first_line(RuntimeError(proc.stderr or proc.stdout or f"exit status {proc.returncode}"), 300)
        raise UserError(f"sbatch refused {script}: {said}")
    # --parsable prints "jobid" or "jobid;cluster".
    return proc.stdout.strip().split(";")[0]
