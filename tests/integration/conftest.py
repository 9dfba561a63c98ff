"""Helpers for tests that run `rlhf` the way a user does: the console script, the real launcher."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.forked import run_forked

REPO = Path(__file__).resolve().parents[2]
RLHF = str(Path(sys.executable).with_name("rlhf"))
QUICK = str(REPO / "configs" / "sft-toy-quick.yaml")
RM_QUICK = str(REPO / "configs" / "rm-toy-quick.yaml")
PPO_QUICK = str(REPO / "configs" / "ppo-toy-quick.yaml")
DPO_QUICK = str(REPO / "configs" / "dpo-toy-quick.yaml")
# One rank started as one process (the same stage program, without DeepSpeed's launcher and its
# two extra interpreters: about 8 s less a run here), for tests whose subject is not the launching.
# The pipeline, presets, multi-rank, kill and SIGTERM tests keep the launcher users get by default.
ONE_PROCESS = ("--launcher", "python")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["RLHF_HOME"] = str(home)
    env.pop("WANDB_MODE", None)  # our own default (offline) must be what keeps wandb off the network
    env["COLUMNS"] = "200"  # keep rich from wrapping the lines tests read
    # DeepSpeed compiles its CPU Adam op on first use, under a lock file that a build killed midway
    # leaves behind, and every later build waits on it forever: keep the tests' builds in their own
    # environment instead of sharing ~/.cache with whatever ran on this machine before.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return env


def rlhf(*args: str, home: Path, timeout: int = 600, cwd: Path | None = None, env: dict[str, str] | None = None,
         fresh_interpreter: bool = False) -> Result:
    """`rlhf args` as a user runs it: its exit status and both streams.

    By default the CLI runs in a fork of this test process, which has torch, transformers and
    DeepSpeed imported already, and so does a stage program it starts on one rank with `--launcher
    python` (tests.forked): the same code from the same `main()`, without ~4 s of imports per
    interpreter. Launchers that start ranks of their own (deepspeed, torchrun, -n 2) still do, as
    real processes. `fresh_interpreter=True` runs the installed console script instead."""
    home.mkdir(parents=True, exist_ok=True)
    wanted = {**cli_env(home), **(env or {})}
    if not fresh_interpreter:
        return Result(*run_forked(["rlhf", *args], env=wanted, cwd=cwd or home, timeout=timeout))
    proc = subprocess.run([RLHF, *args], env=wanted, cwd=cwd or home, capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def rlhf_here(*args: str, home: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> Result:
    """`rlhf` called in this process: the console script's own `main()` with the same environment,
    folder and arguments, its exit status and both streams. For checks that stop before any rank
    starts, where a fresh interpreter would spend ~6 s importing torch, transformers and datasets
    again per case. Restores the environment, folder and argv it changed."""
    from rlhf.cli import main

    home.mkdir(parents=True, exist_ok=True)
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    out, err = io.StringIO(), io.StringIO()
    wanted = {**cli_env(home), **(env or {})}
    try:
        os.environ.clear()
        os.environ.update(wanted)
        os.chdir(cwd or home)
        sys.argv = ["rlhf", *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
    return Result(code, out.getvalue(), err.getvalue())


def entries(home: Path) -> list[dict]:
    result = rlhf("registry", "ls", "--json", home=home)
    assert result.code == 0, result.output
    return json.loads(result.stdout)


def metric_rows(entry: dict) -> list[dict]:
    path = Path(entry["run_dir"]) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_ok(result: Result) -> None:
    assert result.code == 0, f"exit {result.code}\n{result.output[-4000:]}"


def kill_after_checkpoint(stage: str, args: list[str], *, home: Path, min_step: int) -> Path:
    """Start `rlhf <stage> args`, SIGKILL its whole process tree (like a lost node) once a checkpoint
    of at least `min_step` is complete, and return that run's folder."""
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [RLHF, stage, *args], env=cli_env(home), cwd=home,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            found = list(home.glob(f"runs/{stage}-*/checkpoints/resume.json"))
            if found and json.loads(found[0].read_text())["step"] >= min_step:
                return found[0].parent.parent
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        raise AssertionError("no checkpoint written in time")
    finally:
        kill_tree(proc)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and every process under it at once, as a lost node ends them: the ranks run in
    a process group of their own, so a signal to `proc`'s group alone leaves them alive for up to a
    second (rlhf.store.runs._follow_supervisor), long enough to finish and publish beside a resume."""
    tree = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(pid) for pid in tree):
        assert time.time() < deadline, f"processes {tree} outlived SIGKILL"
        time.sleep(0.05)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from Linux's /proc children lists."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (killed orphans wait for init to reap them)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def resume_and_check(
    stage: str, run_dir: Path, *, home: Path, max_steps: int, loss_key: str = "loss", launch: tuple[str, ...] = ()
) -> dict:
    """Resume the killed run; check it continued from its checkpoint and finished; return its entry."""
    killed_at = json.loads((run_dir / "checkpoints" / "resume.json").read_text())["step"]
    assert killed_at < max_steps
    assert entries(home) == [] or run_dir.name not in [e["id"] for e in entries(home)]
    assert not (run_dir / "final").exists()  # nothing saved or published for an unfinished run
    assert run_dir.name in rlhf("registry", "ls", home=home).stdout  # listed as resumable

    result = rlhf(stage, "--resume", *launch, home=home)
    assert_ok(result)
    assert f"resumed {run_dir.name} at step " in result.stdout
    resumed_at = int(result.stdout.split(f"resumed {run_dir.name} at step ")[1].split()[0])
    assert resumed_at >= killed_at
    [entry] = [e for e in entries(home) if e["id"] == run_dir.name]
    assert entry["metrics"]["steps"] == max_steps
    steps = [row["step"] for row in metric_rows(entry) if loss_key in row]
    # Rows past the checkpoint that the killed run wrote were dropped, so each step appears once.
    assert steps == sorted(set(steps)) and steps[-1] == max_steps
    # The resumed run is the same run: a second resume has nothing to continue.
    again = rlhf(stage, "--resume", home=home)
    assert again.code == 2 and f"no unfinished {stage} run" in again.stderr
    return entry


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


def home_with_entries_of(source: Path, home: Path, stages: tuple[str, ...] | None = None) -> Path:
    """A registry of its own holding copies of `source`'s entries (of `stages`, or all; their
    folders stay shared), so a test sees `latest` as the shared parents and only its own runs besides."""
    (home / "entries").mkdir(parents=True)
    for entry in (source / "entries").glob("*.json"):
        if stages is None or json.loads(entry.read_text())["stage"] in stages:
            (home / "entries" / entry.name).write_text(entry.read_text())
    return home


@dataclass
class Pipeline:
    home: Path
    result: Result


def shared_dir(tmp_path_factory) -> Path:
    """The folder of this test run that every pytest-xdist worker sees."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.getbasetemp().parent  # the workers' own temp folders sit side by side in it
    return tmp_path_factory.getbasetemp()


def shared_once(tmp_path_factory, name: str, make) -> Result:
    """`make()`'s result, made once per test run and shared by the pytest-xdist workers: the first to
    need it makes it under a lock, the others wait for it and read its result back."""
    shared = shared_dir(tmp_path_factory)
    record = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            result = make(shared)
            assert_ok(result)
            record.write_text(json.dumps(dataclasses.asdict(result)))
    return Result(**json.loads(record.read_text()))


# The default reward model's 2000 steps take 9 minutes here, most of the suite's critical path; its first
# 800 steps (the cosine schedule over 800) already agree with the oracle on 0.94 of fresh pairs. Its
# full-length quality is a README measurement (`rlhf rm`, `rlhf ppo`), not CI's.
SHORTER = {"rm": ("train.max_steps=800",)}


def default_stage(tmp_path_factory, stage: str, *, report: bool) -> Pipeline:
    """`make pipeline`'s `stage` with every default but SHORTER's, through the console script and
    DeepSpeed's launcher as users run it, in the one registry the session's default stages share: `rlhf
    pipeline --stages sft`, then `--stages rm` (from sft:latest), then `--stages ppo` (from both).
    Split so that a test needing only the SFT entry starts after its minute, not after all three."""
    def make(shared: Path) -> Result:
        flags = () if report else ("--no-report",)
        return rlhf("pipeline", "--stages", stage, *flags, *SHORTER.get(stage, ()), home=shared / "default_pipeline", timeout=1500,
                    fresh_interpreter=True)

    result = shared_once(tmp_path_factory, f"default_{stage}", make)
    return Pipeline(shared_dir(tmp_path_factory) / "default_pipeline", result)


@pytest.fixture(scope="session")
def default_sft(tmp_path_factory) -> Pipeline:
    return default_stage(tmp_path_factory, "sft", report=False)


@pytest.fixture(scope="session")
def default_rm(default_sft, tmp_path_factory) -> Pipeline:
    return default_stage(tmp_path_factory, "rm", report=False)


@pytest.fixture(scope="session")
def default_pipeline(default_rm, tmp_path_factory) -> Pipeline:
    """`make pipeline`'s three stages; its result is the last part's, which prints the summary table
    of the whole lineage and writes the report."""
    return default_stage(tmp_path_factory, "ppo", report=True)


@pytest.fixture(scope="session")
def default_sft_home(default_sft, tmp_path_factory) -> Path:
    """A registry holding the embedded default's SFT entry."""
    return home_with_entries_of(default_sft.home, tmp_path_factory.mktemp("default_sft"), ("sft",))


@pytest.fixture(scope="session")
def default_rm_home(default_rm, tmp_path_factory) -> Path:
    """The embedded default's SFT entry and the reward model trained from it."""
    return home_with_entries_of(default_rm.home, tmp_path_factory.mktemp("default_rm"), ("sft", "rm"))
