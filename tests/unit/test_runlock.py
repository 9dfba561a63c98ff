"""The run lock: one process per run, stale locks of dead processes, hosts and requeued jobs taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from rlhf.errors import UserError
from rlhf.store.runlock import LOCK_FILE, STALE_AFTER_S, RunLock


def plant(run_dir, **holder) -> None:
    (run_dir / LOCK_FILE).write_text(json.dumps({"since": "earlier", **holder}))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path):
    with RunLock(tmp_path):
        held = json.loads((tmp_path / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(UserError, match=f"is being run by pid {os.getpid()} on {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path):  # free again
        pass


def test_a_live_holder_elsewhere_keeps_its_lock(tmp_path):
    plant(tmp_path, host="node-17", pid=4242)
    with pytest.raises(UserError, match="pid 4242 on node-17"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node-17"


def test_a_dead_holder_on_this_host_is_stale(tmp_path):
    plant(tmp_path, host=socket.gethostname(), pid=dead_pid())
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_holder_whose_heartbeat_stopped_is_stale(tmp_path):
    plant(tmp_path, host="node-17", pid=4242)
    old = time.time() - STALE_AFTER_S - 5
    os.utime(tmp_path / LOCK_FILE, (old, old))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_an_earlier_start_of_the_same_slurm_job_is_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "991")
    plant(tmp_path, host="node-17", pid=4242, slurm_job="991", token="node-17:4242")
    with RunLock(tmp_path):
        pass
    plant(tmp_path, host="node-17", pid=4242, slurm_job="990", token="node-17:4242")
    with pytest.raises(UserError):
        RunLock(tmp_path).acquire()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    plant(tmp_path, host="node-17", pid=4242, token="node-17:4242")  # taken over after we looked stale
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node-17"


def test_the_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr("rlhf.store.runlock.HEARTBEAT_S", 0.05)
    with RunLock(tmp_path):
        old = time.time() - 1000
        os.utime(tmp_path / LOCK_FILE, (old, old))
        time.sleep(0.3)
        assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 10
