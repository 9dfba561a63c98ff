"""The launcher command the CLI builds (the real launcher runs in tests/integration)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.errors import UserError
from rlhf.launcher.command import LaunchSpec, build_command, launch_env, stage_program
from rlhf.store.runs import SUPERVISED_ENV


def test_deepspeed_command():
    program = stage_program("sft")
    assert program == "rlhf.stages.sft"  # a module of the package: a wheel runs it as a checkout does
    cmd = build_command(LaunchSpec(program, ("--run-dir", "/r"), num_procs=2, master_port=1234), python="py")
    assert cmd == ["py", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "1234",
                   "--no_local_rank", "--log_level", "error", "--module", program, "--run-dir", "/r"]
    # -v: the launcher's own INFO lines again.
    verbose = build_command(LaunchSpec(program, ("--run-dir", "/r"), num_procs=2, master_port=1234, verbose=True), python="py")
    assert "--log_level" not in verbose and verbose[-4:] == ["--module", program, "--run-dir", "/r"]


def test_hostfile_is_passed_and_checked(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\n")
    cmd = build_command(LaunchSpec(Path("p.py"), (), num_procs=8, hostfile=hostfile, master_port=1), python="py")
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile)
    with pytest.raises(UserError, match="hostfile not found"):
        build_command(LaunchSpec(Path("p.py"), (), hostfile=tmp_path / "missing"))


def test_torchrun_and_python_commands():
    cmd = build_command(LaunchSpec(Path("p.py"), ("a",), num_procs=3, launcher="torchrun", master_port=99), python="py")
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"] and "--nproc-per-node=3" in cmd and cmd[-2:] == ["p.py", "a"]
    assert build_command(LaunchSpec(Path("p.py"), ("a",), launcher="python"), python="py") == ["py", "p.py", "a"]
    with pytest.raises(UserError, match="one rank"):
        build_command(LaunchSpec(Path("p.py"), (), num_procs=2, launcher="python"))
    # A stage is a module: each launcher runs it as `python -m` would.
    module = build_command(LaunchSpec("rlhf.stages.rm", ("a",), num_procs=2, launcher="torchrun", master_port=99), python="py")
    assert module[-3:] == ["-m", "rlhf.stages.rm", "a"]
    assert build_command(LaunchSpec("rlhf.stages.rm", ("a",), launcher="python"), python="py") == ["py", "-m", "rlhf.stages.rm", "a"]


def test_env_splits_cores_between_ranks_unless_user_set_it(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert launch_env(4, base={})["OMP_NUM_THREADS"] == "2"
    assert launch_env(16, base={})["OMP_NUM_THREADS"] == "1"
    assert launch_env(4, base={"OMP_NUM_THREADS": "5"})["OMP_NUM_THREADS"] == "5"


def test_unknown_stage_program():
    with pytest.raises(UserError, match="no stage program"):
        stage_program("nope")


def test_unknown_launcher():
    with pytest.raises(UserError, match="--launcher must be one of deepspeed, torchrun, python"):
        build_command(LaunchSpec(Path("p.py"), (), launcher="mpirun"))  # type: ignore[arg-type]


def test_cores_are_the_ones_this_process_may_use(monkeypatch):
    from rlhf.launcher.command import usable_cores

    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {3, 5})  # e.g. a SLURM job's cgroup on a big node
    assert usable_cores() == 2 and launch_env(2, base={})["OMP_NUM_THREADS"] == "1"


def _publish_as_rank(supervisor: str, home: Path) -> subprocess.CompletedProcess:
    """Run.publish in a fresh process whose RLHF_SUPERVISED names `supervisor` (host:pid)."""
    code = (
        "import sys; from pathlib import Path; from rlhf.store.registry import Registry; from rlhf.store.entry import Entry\n"
        "from rlhf.store.runs import Run\n"
        "home = Path(sys.argv[1]); folder = home / 'runs' / 'sft-x' / 'final'; folder.mkdir(parents=True)\n"
        "(folder / 'config.json').write_text('{}')\n"
        "run = Run('sft', 'sft-x', folder.parent, None, Registry(home))\n"
        "run.publish(Entry(id='sft-x', stage='sft', status='completed', created='2026-01-01T00:00:00+00:00', path=str(folder),\n"
        "                  run_dir=str(folder.parent), config={}))\n"
    )
    env = {**os.environ, SUPERVISED_ENV: supervisor}
    return subprocess.run([sys.executable, "-c", code, str(home)], env=env, capture_output=True, text=True, timeout=120)


def test_a_rank_whose_rlhf_is_gone_dies_instead_of_publishing(tmp_path):
    # A pid that has exited: the ranks of a SIGKILLed `rlhf` outlive it by up to a second.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = _publish_as_rank(f"{socket.gethostname()}:{gone.pid}", tmp_path / "orphan")
    assert orphan.returncode == -signal.SIGKILL, orphan.stderr
    assert not (tmp_path / "orphan" / "entries" / "sft-x.json").exists()
    # With its `rlhf` alive (here, this test process) the same publish goes through.
    supervised = _publish_as_rank(f"{socket.gethostname()}:{os.getpid()}", tmp_path / "supervised")
    assert supervised.returncode == 0, supervised.stderr
    assert (tmp_path / "supervised" / "entries" / "sft-x.json").is_file()


def test_a_missing_config_names_the_presets_when_it_could_have_been_one(tmp_path, monkeypatch):
    from rlhf.config import SFTConfig, load_config
    from rlhf.config.presets import config_file, preset

    assert config_file("sft-toy-quick") == config_file("sft-toy-quick.yaml") == preset("sft-toy-quick")
    (tmp_path / "sft-toy-quick.yaml").write_text("train:\n  max_steps: 3\n")
    monkeypatch.chdir(tmp_path)
    assert config_file("sft-toy-quick.yaml") == Path("sft-toy-quick.yaml")  # a file here wins over the preset
    with pytest.raises(UserError, match=r"config file not found: nope; nor is it a preset \(presets: .*sft-toy-quick"):
        load_config(SFTConfig, config_file("nope"))
    with pytest.raises(UserError, match=r"config file not found: [^;]*/nope.yaml$"):
        load_config(SFTConfig, config_file(tmp_path / "nope.yaml"))
