"""The `rlhf` CLI, and the one-rank stage programs it launches, in forks of the test process.

A fresh interpreter for `rlhf` and another for its rank each spend seconds importing torch,
transformers, DeepSpeed and datasets; the suite starts dozens of them. A fork of a process that
has imported them already starts at once and runs the same `main()` on the same arguments,
environment and folder, in a process of its own: the test process's state is untouched, and a
stage's process group, seeds and signal handlers are its own as under a real launch.

Only `--launcher python` (one rank, started as `python -m rlhf.stages.<stage> --run-dir ...`) is
forked: the deepspeed and torchrun launchers start their ranks as real processes, as they do for
users, and the tests about launching use them (or `fresh_interpreter=True`).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path


def preload() -> None:
    """Import what every CLI call and stage program imports, once, in the process that forks them."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator when first imported
    import datasets  # noqa: F401
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import rlhf.cli  # noqa: F401
    import rlhf.models.stage_models  # noqa: F401
    import rlhf.training.engine  # noqa: F401
    import rlhf.training.evaluation  # noqa: F401


def run_forked(argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str, str]:
    """`argv` (`["rlhf", ...]`) through `rlhf.cli.main` in a child process: (exit status, stdout, stderr)."""
    preload()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(lambda: _cli_main(argv), env=env, cwd=cwd, out=out.fileno(), err=err.fileno())
        code = _wait(pid, timeout)
        out.seek(0)
        err.seek(0)
        return code, out.read().decode(errors="replace"), err.read().decode(errors="replace")


def _cli_main(argv: list[str]) -> None:
    import rlhf.launcher.command

    real = rlhf.launcher.command.run_supervised
    # `rlhf.cli.launch` imports it from rlhf.launcher.command when it launches, so the child's own module is patched.
    rlhf.launcher.command.run_supervised = lambda cmd, env: _supervised(cmd, env, real)
    sys.argv = list(argv)
    from rlhf.cli import main

    main()


def _supervised(cmd: list[str], env: dict[str, str], real):
    """rlhf.launcher.command.run_supervised, with a one-rank `python -m rlhf.stages.X ...` run as a fork of this process."""
    from rlhf.launcher.command import STAGES_PACKAGE, Outcome

    if len(cmd) < 3 or cmd[0] != sys.executable or cmd[1] != "-m" or not cmd[2].startswith(f"{STAGES_PACKAGE}."):
        return real(cmd, env)
    pid = os.fork()
    if pid == 0:
        _child(lambda: _program_main(cmd), env=env, cwd=Path.cwd(), out=None, err=None)
    _, status = os.waitpid(pid, 0)
    return Outcome(code=os.waitstatus_to_exitcode(status))


def _program_main(cmd: list[str]) -> None:
    import runpy

    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))  # what the variable does for a fresh interpreter
    sys.argv = [cmd[2], *cmd[3:]]
    sys.path[0] = os.getcwd()  # what `python -m` puts first
    runpy.run_module(cmd[2], run_name="__main__", alter_sys=True)


def _child(body, *, env: dict[str, str], cwd: Path, out: int | None, err: int | None) -> None:
    """Run `body` as a process of its own (a new session, like `start_new_session`) and exit with its status."""
    code = 1
    try:
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        if out is not None:
            os.dup2(out, 1)
            os.dup2(err, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        _fit_consoles()
        try:
            body()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _fit_consoles() -> None:
    """Rich reads COLUMNS when a console is made, which was in the test process: read it again."""
    from rlhf.training.tracking import console, err_console

    columns = os.environ.get("COLUMNS", "")
    for each in (console, err_console):
        each.width = int(columns) if columns.isdigit() else 80


def _wait(pid: int, timeout: float) -> int:
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            raise TimeoutError(f"rlhf did not finish within {timeout} s")
        select.select([], [], [], 0.05)
