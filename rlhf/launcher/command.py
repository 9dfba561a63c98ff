"""Builds the command that starts a stage program on N local ranks (or a hostfile's nodes).

The CLI only turns a stage into an argv list and runs it: no shell, nothing hidden, and
`--dry-run` prints exactly what would run. The same stage program runs under the deepspeed
launcher, torchrun, plain python (one rank), or srun inside a SLURM allocation (one torchrun per
node, meeting at the rendezvous the batch script set up in MASTER_ADDR / MASTER_PORT).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhf.errors import UserError
from rlhf.launcher.ports import free_port
from rlhf.training.tracking import VERBOSE_ENV

Launcher = Literal["deepspeed", "torchrun", "python", "srun"]
LAUNCHERS: tuple[str, ...] = typing.get_args(Launcher)
STAGES_PACKAGE = "rlhf.stages"
STAGES_DIR = Path(__file__).resolve().parents[1] / "stages"


def stage_program(stage: str) -> str:
    """The module a stage's ranks run (`python -m rlhf.stages.<stage>`): run as a module of the
    installed package, never as a file, so a wheel works as a checkout does."""
    if not (STAGES_DIR / f"{stage}.py").is_file():
        raise UserError(f"no stage program {STAGES_PACKAGE}.{stage} in {STAGES_DIR}; reinstall rlhf")
    return f"{STAGES_PACKAGE}.{stage}"


def _program_argv(program: Path | str, module_flag: str) -> list[str]:
    """A script file as is; a module name (a `str`) behind the launcher's module flag."""
    return [module_flag, program] if isinstance(program, str) else [str(program)]


@dataclass(frozen=True)
class LaunchSpec:
    program: Path | str
    """A script file, or the name of a module to run as `python -m` does (a stage: `stage_program`)."""
    program_args: tuple[str, ...]
    num_procs: int = 1
    launcher: Launcher = "deepspeed"
    hostfile: Path | None = None
    master_port: int | None = None
    verbose: bool = False
    """Let the launcher and the libraries in the ranks say everything (`rlhf <stage> -v`)."""


def build_command(spec: LaunchSpec, *, python: str = sys.executable) -> list[str]:
    """The argv that starts `spec.program` on `spec.num_procs` ranks per node."""
    if spec.launcher not in LAUNCHERS:
        raise UserError(f"--launcher must be one of {', '.join(LAUNCHERS)}, not '{spec.launcher}'")
    if spec.num_procs < 1:
        raise UserError(f"--num-gpus must be at least 1, got {spec.num_procs}")
    if spec.launcher == "srun":
        return srun_command(spec, python=python)
    port = spec.master_port or free_port()
    if spec.launcher == "python":
        if spec.num_procs != 1 or spec.hostfile:
            raise UserError("--launcher python runs one rank; use deepspeed or torchrun for more")
        return [python, *_program_argv(spec.program, "-m"), *spec.program_args]
    if spec.launcher == "torchrun":
        if spec.hostfile:
            raise UserError("--hostfile needs --launcher deepspeed (torchrun takes its nodes from SLURM or its own flags)")
        return [
            python, "-m", "torch.distributed.run",
            f"--nproc-per-node={spec.num_procs}", "--master-addr=127.0.0.1", f"--master-port={port}",
            *_program_argv(spec.program, "-m"), *spec.program_args,
        ]
    cmd = [python, "-m", "deepspeed.launcher.runner"]
    if spec.hostfile:
        if not spec.hostfile.is_file():
            raise UserError(f"hostfile not found: {spec.hostfile}")
        cmd += ["--hostfile", str(spec.hostfile)]
    # --no_local_rank: ranks read LOCAL_RANK from the environment like under torchrun.
    cmd += ["--num_gpus", str(spec.num_procs), "--master_port", str(port), "--no_local_rank"]
    if not spec.verbose:
        # Its INFO and WARNING lines ("Unable to find hostfile", "Setting CUDA_VISIBLE_DEVICES=0" on a
        # CPU machine, each rank's environment) say nothing a user acts on; errors still show.
        cmd += ["--log_level", "error"]
    return cmd + [*_program_argv(spec.program, "--module"), *spec.program_args]


def srun_command(spec: LaunchSpec, *, python: str = sys.executable, env: Mapping[str, str] | None = None) -> list[str]:
    """Inside a SLURM allocation: one srun task per node, each a torchrun starting that node's ranks.

    The ranks meet at a c10d rendezvous on MASTER_ADDR:MASTER_PORT (the first node of the
    allocation, set by the batch script `rlhf submit` renders), so no node needs to know its rank.
    """
    env = os.environ if env is None else env
    missing = [name for name in ("SLURM_JOB_ID", "SLURM_NNODES", "MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise UserError(
            f"--launcher srun runs inside a SLURM batch job ({', '.join(missing)} not set); "
            "submit the stage with `rlhf submit` instead"
        )
    if spec.hostfile:
        raise UserError("--hostfile is for the deepspeed launcher; under srun the nodes are the allocation's")
    nodes = env["SLURM_NNODES"]
    return [
        "srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        python, "-m", "torch.distributed.run",
        f"--nnodes={nodes}", f"--nproc-per-node={spec.num_procs}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={env['MASTER_ADDR']}:{env['MASTER_PORT']}",
        f"--rdzv-id={env['SLURM_JOB_ID']}",
        *_program_argv(spec.program, "-m"), *spec.program_args,
    ]


def usable_cores() -> int:
    """The cores this process may run on (a SLURM cgroup, `taskset`), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity call (macOS)
        return os.cpu_count() or 1


def launch_env(num_procs: int, base: dict[str, str] | None = None, *, verbose: bool = False) -> dict[str, str]:
    """The environment for the launched ranks: the CPU accelerator when no GPU is visible."""
    env = dict(os.environ if base is None else base)
    if verbose:
        env[VERBOSE_ENV] = "1"  # the ranks leave the libraries' logging alone (rlhf.training.tracking.quiet_libraries)
    if "DS_ACCELERATOR" not in env and not _cuda_visible():
        env["DS_ACCELERATOR"] = "cpu"
    if "OMP_NUM_THREADS" not in env:
        # Ranks that together ask for more threads than there are cores spin against each other:
        # measured here, a toy step went from 20 ms to 700-2000 ms with 2 ranks x 2 threads on 2 cores.
        env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // num_procs))
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Quiet tokenizers' fork warning; each rank tokenizes on its own anyway.
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@dataclass
class Outcome:
    code: int
    """The launcher's exit status (negative: killed by that signal)."""
    stop_signals: list[int] = field(default_factory=list)
    """Stop signals `rlhf` received and passed on to the run while it ran."""


def run_supervised(cmd: list[str], env: dict[str, str]) -> Outcome:
    """Run the launcher in a process group of its own and return only once every process of that
    group has exited: the launcher, its helpers and every rank.

    A stop signal to `rlhf` (SIGTERM, SIGINT, SIGUSR1) goes on to the whole group as SIGTERM, so each
    rank saves a checkpoint and stops; a second one kills the group. Without this, a SIGTERM to `rlhf`
    alone left the ranks training and publishing, and a signal to the whole group ended `rlhf` before
    its ranks had finished their checkpoint.
    """
    _adopt_orphans()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    outcome = Outcome(code=0)

    def forward(signum: int, frame: object) -> None:
        outcome.stop_signals.append(signum)
        _signal_group(proc.pid, signal.SIGTERM if len(outcome.stop_signals) == 1 else signal.SIGKILL)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        outcome.code = proc.wait()
        _wait_for_group(proc.pid)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return outcome


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _adopt_orphans() -> None:
    """Become the parent of the run's processes whose own parent exits first (Linux's child
    subreaper), so waiting for them reaps them instead of leaving zombies in the group."""
    if sys.platform != "linux":
        return
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _wait_for_group(pgid: int) -> None:
    """Block until no process of group `pgid` is left (ranks outlive a launcher killed by a signal)."""
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        try:
            os.waitpid(-1, os.WNOHANG)  # reap adopted orphans that already exited
        except ChildProcessError:
            pass
        time.sleep(0.1)


def format_command(cmd: list[str], env: dict[str, str]) -> str:
    shown = [f"{k}={env[k]}" for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS", VERBOSE_ENV) if k in env]
    return " ".join(shown + [shlex.join(cmd)])


def _cuda_visible() -> bool:
    import torch  # imported here so `rlhf --help` never pays for it

    return torch.cuda.is_available()
