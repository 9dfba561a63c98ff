"""A sandboxed Python tool: run a policy's code in a separate, limited process and say in one
line why it was stopped.

Layers, each catching what another may miss:
  1. a fresh interpreter, `python -I -S -B -u` (no environment variables read, no site-packages,
     no bytecode written), with an environment holding only TMPDIR, in a fresh temp dir as cwd
     that is deleted afterwards;
  2. rlimits set between fork and exec: CPU, address space, file size, open files, processes;
  3. an audit hook in the child (`_sandbox_child.py`) refusing sockets, process creation, writes
     outside the temp dir, reads outside it and the standard library, ctypes, and raising rlimits;
  4. a seccomp filter (`_seccomp.py`): threads, but no fork, vfork or process-making clone;
     as root also a new network namespace (only loopback, down), and no capabilities after exec
     (SECBIT_NOROOT): uid 0 still owns root's files, but cannot mknod, mount or raise rlimits;
  5. as root, a drop to `nobody` when that user can run this interpreter (not when it lives under
     a 0700 /root, as a pyenv install does), so that RLIMIT_NPROC binds and file modes apply;
  6. a wall-clock limit, an output cap read incrementally, and SIGKILL to the whole process group.
Not root, or root without 5, the audit hook alone keeps the code off the network (not root) and off
what this process's user may read and write.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pwd
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import first_line
from rlhf.tools import _sandbox_child as child
from rlhf.tools import _seccomp

_CHILD_SOURCE = Path(child.__file__).read_text(encoding="utf-8")
# <sched.h>, <sys/prctl.h>, <linux/securebits.h>
_CLONE_NEWNET = 0x40000000
_PR_SET_SECUREBITS, _SECBIT_NOROOT, _SECBIT_NOROOT_LOCKED = 28, 1, 2
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_READ_CHUNK = 65536
# After the process group is killed, what is left in the pipe arrives at once; this only bounds
# the wait when a process escaped the group and still holds the pipe.
_DRAIN_S = 0.5


@dataclass(frozen=True)
class SandboxLimits:
    """What one run may use."""

    time_s: float = 5.0
    """Wall-clock limit in seconds; the CPU rlimit is this rounded up plus one, a backstop."""
    memory_mb: int = 512
    """Address-space limit (RLIMIT_AS) in MiB; the interpreter itself maps a few tens."""
    output_bytes: int = 65536
    """stdout and stderr together, in bytes; more is cut and the run stopped."""
    file_bytes: int = 4 * 2**20
    """Largest file the code may write (RLIMIT_FSIZE)."""
    files: int = 64
    """How many times the code may open a file for writing: with file_bytes, a bound on the disk it can fill."""
    open_files: int = 64
    """RLIMIT_NOFILE."""
    processes: int = 32
    """RLIMIT_NPROC, which counts every process and thread of the user and never binds uid 0: a
    backstop behind the seccomp filter, mostly for the drop to `nobody`."""

    def __post_init__(self) -> None:
        for name in ("time_s", "memory_mb", "output_bytes", "file_bytes", "files", "open_files", "processes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)}")


DEFAULT_LIMITS = SandboxLimits()


@dataclass(frozen=True)
class ToolResult:
    """A tool's answer: what it printed, whether it ran to a normal end, and if not, why, in one line."""

    output: str
    ok: bool
    reason: str | None = None


def _refusal_reasons(limits: SandboxLimits) -> dict[int, str]:
    return {
        child.EXIT_NETWORK: "error: network is disabled",
        child.EXIT_WRITE: "error: writing outside the sandbox is refused",
        child.EXIT_READ: "error: reading outside the sandbox is refused",
        child.EXIT_PROCESS: "error: starting or signalling processes is refused",
        child.EXIT_UNSAFE: "error: low-level access (ctypes, gc, ioctl, rlimits, namespaces) is refused",
        child.EXIT_MEMORY: f"error: memory limit of {limits.memory_mb} MiB exceeded",
        child.EXIT_FILE_SIZE: f"error: file size limit of {limits.file_bytes} bytes exceeded",
        child.EXIT_FILES: f"error: more than {limits.files} files opened for writing",
    }


@functools.lru_cache(maxsize=1)
def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _drop_to(ids: tuple[int, int]) -> None:
    uid, gid = ids
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


@functools.lru_cache(maxsize=1)
def drops_privileges() -> bool:
    """Whether runs drop root to `nobody`: only as root, and only if `nobody` can start this
    interpreter and read its standard library (asked once, by trying)."""
    if os.geteuid() != 0:
        return False
    try:
        probe = subprocess.run([sys.executable, "-I", "-S", "-c", "import json"], cwd="/", env={}, capture_output=True,
                               preexec_fn=functools.partial(_drop_to, _nobody()), timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


_KernelCall = tuple[Callable[..., int], tuple[object, ...]]


@functools.lru_cache(maxsize=1)
def _kernel_calls() -> tuple[_KernelCall, ...]:
    """The libc calls the child makes before exec, in order, prepared here: looking a function up
    takes the loader's lock, which must not happen between fork and exec. Each fails harmlessly
    where it may not (not root, no seccomp): the layers above it still hold."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        unshare, prctl = libc.unshare, libc.prctl
    except (OSError, AttributeError):
        return ()

    def call(function: Callable[..., int], *args: int) -> _KernelCall:
        return function, tuple(ctypes.c_ulong(a) for a in args)  # prctl's varargs are unsigned longs

    calls = [
        call(unshare, _CLONE_NEWNET),  # the audit hook refuses sockets either way
        # Root that stays root after exec keeps uid 0 but no capability: no mknod (a disk's device
        # node inside the sandbox), no mount, no raising a hard rlimit, no reading past file modes.
        call(prctl, _PR_SET_SECUREBITS, _SECBIT_NOROOT | _SECBIT_NOROOT_LOCKED, 0, 0, 0),
        call(prctl, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
        call(prctl, _seccomp.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),  # what lets a non-root process install a filter
    ]
    program = _seccomp.no_fork_filter()
    if program is not None:
        ulong = ctypes.c_ulong  # byref keeps the program alive as long as the call that points at it
        calls.append((prctl, (ulong(_seccomp.PR_SET_SECCOMP), ulong(_seccomp.SECCOMP_MODE_FILTER), ctypes.byref(program),
                              ulong(0), ulong(0))))
    return tuple(calls)


def _rlimits(limits: SandboxLimits) -> list[tuple[int, tuple[int, int]]]:
    """(resource, (soft, hard)) for the child, none above this process's own hard limits, which
    only root could raise."""
    wanted = {
        resource.RLIMIT_CPU: int(limits.time_s) + 1,
        resource.RLIMIT_AS: limits.memory_mb * 2**20,
        resource.RLIMIT_FSIZE: limits.file_bytes,
        resource.RLIMIT_NOFILE: limits.open_files,
        resource.RLIMIT_NPROC: limits.processes,
        resource.RLIMIT_CORE: 0,
    }
    pairs = []
    for which, soft in wanted.items():
        # Past the soft CPU limit comes SIGXCPU, which code may ignore; the hard one is SIGKILL.
        hard = soft + 1 if which == resource.RLIMIT_CPU else soft
        ceiling = resource.getrlimit(which)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        pairs.append((which, (soft, hard)))
    return pairs


def _child_setup(calls: tuple[_KernelCall, ...], rlimits: list[tuple[int, tuple[int, int]]], drop: tuple[int, int] | None) -> None:
    """Runs in the child between fork and exec, so it only calls what the parent prepared (a lock
    another thread held at the fork would never be released here)."""
    for function, args in calls:
        function(*args)
    for which, pair in rlimits:
        resource.setrlimit(which, pair)
    if drop is not None:
        _drop_to(drop)


def _exited(pid: int) -> bool:
    """Whether the child ended, without reaping it: until reaped, its pid (the process group's id)
    cannot be reused, so killing the group afterwards cannot hit a stranger."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _collect(proc: subprocess.Popen, limits: SandboxLimits) -> tuple[bytearray, str | None]:
    """Read the child's output until it exits, writes past the cap, or runs out of time; never
    holds more than the cap plus one chunk. Returns (output, "output" | "time" | None)."""
    assert proc.stdout is not None  # started with stdout=PIPE
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    output = bytearray()
    deadline = time.monotonic() + limits.time_s
    open_ = True
    while not _exited(proc.pid):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return output, "time"
        if not open_:  # the child closed its stdout but runs on
            time.sleep(min(remaining, 0.01))
            continue
        if poller.poll(min(remaining, 0.05) * 1000):
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:  # a spurious wake-up
                continue
            if not chunk:
                open_ = False
            output += chunk
            if len(output) > limits.output_bytes:
                return output, "output"
    return output, None


def _drain(fd: int, output: bytearray, cap: int) -> None:
    """Append what the child wrote just before it ended: it is still in the pipe."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + _DRAIN_S
    while len(output) <= cap and (remaining := deadline - time.monotonic()) > 0:
        if not poller.poll(remaining * 1000):
            return
        try:
            chunk = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            continue
        if not chunk:
            return
        output += chunk


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is already gone
        pass


def _execute(sandbox: str, limits: SandboxLimits, drop: tuple[int, int] | None) -> tuple[bytearray, str | None, int]:
    """Start the child in `sandbox` and watch it; returns (output, overrun, exit status)."""
    argv = [sys.executable, "-I", "-S", "-B", "-u", "-X", "utf8", "-c", _CHILD_SOURCE, sandbox, str(limits.files)]
    with subprocess.Popen(argv, cwd=sandbox, env={"TMPDIR": sandbox}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, close_fds=True, start_new_session=True,
                          preexec_fn=functools.partial(_child_setup, _kernel_calls(), _rlimits(limits), drop)) as proc:
        try:
            output, overrun = _collect(proc, limits)
        finally:
            _kill_group(proc.pid)  # what it forked, too; also when the caller is interrupted
        if overrun != "output":
            assert proc.stdout is not None  # started with stdout=PIPE
            _drain(proc.stdout.fileno(), output, limits.output_bytes)
    return output, overrun, proc.returncode


def _reason(status: int, overrun: str | None, output: str, limits: SandboxLimits) -> str | None:
    """The one line the policy reads; None for a run that ended normally."""
    if overrun == "output":
        return f"error: output over {limits.output_bytes} bytes, cut"
    if overrun == "time" or status == -signal.SIGXCPU:
        return f"error: time limit of {limits.time_s:g} s exceeded"
    if status == 0:
        return None
    refusals = _refusal_reasons(limits)
    if status in refusals:
        return refusals[status]
    if status == -signal.SIGXFSZ:
        return refusals[child.EXIT_FILE_SIZE]
    if status == child.EXIT_EXCEPTION:  # the traceback's last line names the exception
        lines = [line for line in output.splitlines() if line.strip()]
        return "error: " + (lines[-1].strip()[:200] if lines else "the code raised an exception")
    if status < 0:
        try:
            return f"error: killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"error: killed by signal {-status}"
    return f"error: exit status {status}"


def _remove_tree(path: str) -> None:
    """Delete the sandbox dir, even where the code made a folder unreadable (chmod 000)."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    folders = [path]
    while folders:
        folder = folders.pop()
        os.chmod(folder, 0o700)
        folders.extend(e.path for e in os.scandir(folder) if e.is_dir(follow_symlinks=False))
    # Whatever still resists stays behind: a tool call must not end the training run.
    shutil.rmtree(path, ignore_errors=True)


def run_python(code: str, *, limits: SandboxLimits = DEFAULT_LIMITS) -> ToolResult:
    """Run `code` in a fresh sandboxed interpreter (see the module docstring); whatever the code
    does, this returns its capped output and, unless it ended normally, a one-line reason."""
    drop = _nobody() if drops_privileges() else None
    sandbox = os.path.realpath(tempfile.mkdtemp(prefix="rlhf-sandbox-"))
    try:
        main = Path(sandbox, "main.py")
        main.write_text(code, encoding="utf-8", errors="surrogatepass")
        if drop is not None:
            os.chown(sandbox, *drop)
            os.chown(main, *drop)
        output, overrun, status = _execute(sandbox, limits, drop)
    except (OSError, subprocess.SubprocessError) as exc:  # EAGAIN from fork and the like: the machine's trouble
        return ToolResult(output="", ok=False, reason=f"error: the sandbox could not start ({first_line(exc)})")
    finally:
        _remove_tree(sandbox)
    text = bytes(output[: limits.output_bytes]).decode("utf-8", errors="replace")
    reason = _reason(status, overrun, text, limits)
    return ToolResult(output=text, ok=reason is None, reason=reason)
