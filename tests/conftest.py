"""Settings every test process shares.

`make test` runs two pytest workers (pytest-xdist) on a 2-core machine. Each worker and everything
it starts (the `rlhf` CLI, DeepSpeed's ranks) is held to one OpenMP thread per process: two jobs of
two threads each on two cores would oversubscribe them, and spinning OpenMP threads then make every
job several times slower instead of each twice as slow.
"""

from __future__ import annotations

import os


def pytest_configure(config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Before any test module imports torch; the launcher keeps an OMP_NUM_THREADS it is given.
        os.environ["OMP_NUM_THREADS"] = "1"
