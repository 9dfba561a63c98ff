"""Settings every test process shares.

`make test` runs two pytest workers (pytest-xdist) on a 2-core machine. Each worker and everything
it starts (the `rlhf` CLI, DeepSpeed's ranks) is held to one OpenMP thread per process: two jobs of
two threads each on two cores would oversubscribe them, and spinning OpenMP threads then make every
job several times slower instead of each twice as slow.
"""

from __future__ import annotations

import os
import tempfile


def pytest_configure(config) -> None:
    # Before any test module imports torch; the launcher keeps an OMP_NUM_THREADS it is given. Without
    # xdist too: tests/forked.py forks this process, and a fork of a process whose OpenMP team has
    # started hangs at its first parallel op (seen: a resumed rank stuck in load_state_dict after the
    # test before it had compared weights with two threads).
    os.environ["OMP_NUM_THREADS"] = "1"
    if not os.environ.get("PYTEST_XDIST_WORKER") and "RLHF_SEAL_KEY" not in os.environ:
        # The runs' seal key (rlhf.store.start_record): one per session, shared by the workers it starts,
        # rather than the user's own ~/.config/rlhf/seal.key.
        os.environ["RLHF_SEAL_KEY"] = os.path.join(tempfile.mkdtemp(prefix="rlhf-seal-"), "seal.key")


# pytest-xdist (--dist loadfile --no-loadscope-reorder) hands out whole files in collection order,
# so this order is the schedule. The first file's first test builds the session's default stages
# (sft, then rm, then ppo: about 5 minutes in all); the long files that need none of them come next,
# so the other worker is busy meanwhile; then the files that start from the SFT entry alone (ready
# after its first minute), then those that need the reward model too; every other file (unit tests,
# seconds each) fills in at the end.
SCHEDULE = (
    "integration/test_pipeline_cli.py",
    "integration/test_real_model.py",
    "integration/test_sft_cli.py",
    "integration/test_slurm.py",
    "integration/test_resume.py",
    "integration/test_dpo_cli.py",
    "integration/test_feedback_cli.py",
    "integration/test_run_safety.py",
    "integration/test_compare.py",
    "integration/test_rm_cli.py",
    "integration/test_ppo_cli.py",
    "integration/test_bon_cli.py",
    "integration/test_ppo_critic_free.py",
    "integration/test_presets.py",
)


def schedule_rank(path: str) -> int:
    for rank, suffix in enumerate(SCHEDULE):
        if path.endswith(suffix):
            return rank
    return len(SCHEDULE) + (0 if "/integration/" in path else 1)


def pytest_collection_modifyitems(config, items) -> None:
    items.sort(key=lambda item: schedule_rank(item.path.as_posix()))  # stable: a file keeps its own order


# Seconds per test file (setup, call and teardown of its tests, in whichever worker ran them),
# printed after pytest's own per-test --durations: where a slower suite spends its time.
_FILE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report) -> None:
    path = report.nodeid.split("::", 1)[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    if not _FILE_SECONDS:
        return
    terminalreporter.write_sep("=", "seconds per test file")
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda item: -item[1]):
        if seconds >= 1.0:
            terminalreporter.write_line(f"{seconds:8.1f}s {path}")
    terminalreporter.write_line(f"{sum(_FILE_SECONDS.values()):8.1f}s in all (every worker's time added up)")
