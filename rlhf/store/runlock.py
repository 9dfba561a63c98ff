"""One process runs a run: a lock file in the run folder, held by the `rlhf` process that launches it.

Two `rlhf sft --resume --run X` at once would train into the same checkpoints and final folder.
The lock is a file created with O_EXCL (atomic on local filesystems, NFSv3+ and Lustre) holding the
holder's host, pid and SLURM job; the holder refreshes its mtime every `HEARTBEAT_S`. A lock is
stale, and is taken over, when its holder is on this host and no longer alive, when it belongs to
an earlier start of the same SLURM job (a requeue), or when its heartbeat stopped: a dead node
cannot remove its lock, but it stops touching it. Standard library only.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from rlhf.errors import UserError

LOCK_FILE = "lock.json"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 90.0  # six missed heartbeats


class RunLock:
    """Hold the lock of `run_dir` while the block runs: `with RunLock(run_dir): ...`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        record = json.dumps(_me()).encode()
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if not _stale(holder, self.path):
                    raise UserError(_held_message(self.path, holder)) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(record)
            self._beat = threading.Thread(target=self._heartbeat, name="rlhf-run-lock", daemon=True)
            self._beat.start()
            return
        raise UserError(f"could not take the lock {self.path}: another process keeps taking it; try again")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
            if _read(self.path).get("token") == _me()["token"]:
                self.path.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # storage hiccup: the next beat tries again


def _me() -> dict[str, object]:
    return {
        "host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": f"{socket.gethostname()}:{os.getpid()}",
    }


def _read(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # vanished, or half written by a holder that died at once
    return data if isinstance(data, dict) else {}


def _stale(holder: dict[str, object], path: Path) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    if age > STALE_AFTER_S:
        return True
    me = _me()
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"] and holder.get("token") != me["token"]:
        return True  # the same SLURM job started again (requeued): its earlier start is gone
    pid = holder.get("pid")
    if holder.get("host") == me["host"] and isinstance(pid, int):
        return not _alive(pid)
    return False  # alive elsewhere, or unreadable but fresh (a holder between create and write)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _held_message(path: Path, holder: dict[str, object]) -> str:
    who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}" if holder else "another process"
    return (
        f"run {path.parent.name} is being run by {who} ({path}); wait for it to finish, or stop it. If that "
        f"process is gone, the lock expires {int(STALE_AFTER_S)} s after its last heartbeat"
    )
