"""Test-only: whether the SLURM tests may set up a cluster on this machine, and what they say about it.

scripts/slurm-local.sh installs slurm-wlm and munge and writes /etc/slurm and /etc/munge when it
sets a cluster up. The tests let it do that only as root where that is wanted: on CI (CI=true) or
when the user opts in with RLHF_TEST_SLURM_SETUP=1. Elsewhere they run it with --no-install: a
running cluster (or one it configured before, which root can start) is used, and nothing is
installed or written under /etc.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

OPT_IN = "RLHF_TEST_SLURM_SETUP"
HOW_TO_OPT_IN = (f"run the tests as root with {OPT_IN}=1 (CI=true does the same) to let them install slurm-wlm and munge "
                 "and write /etc/slurm and /etc/munge")
CHANGED = "slurm-local: changed: "  # how the script reports each change it makes to packages or /etc


def may_set_up(env: Mapping[str, str], *, root: bool) -> bool:
    """Whether the tests may install packages and write under /etc: as root, on CI or opted in."""
    return root and (env.get("CI") == "true" or env.get(OPT_IN) == "1")


def start_command(script: Path, *, set_up: bool) -> list[str]:
    return [str(script), "start"] if set_up else [str(script), "start", "--no-install"]


def skip_reason(why: str, *, set_up: bool) -> str:
    """Why the tests skip, and how to let them set SLURM up where they were not allowed to."""
    return f"no SLURM here: {why}" if set_up else f"no SLURM here: {why}; {HOW_TO_OPT_IN}"


def changes_line(stdout: str, env: Mapping[str, str]) -> str | None:
    """One line naming every change the script made to this machine (None when it made none)."""
    changes = [line.removeprefix(CHANGED) for line in stdout.splitlines() if line.startswith(CHANGED)]
    if not changes:
        return None
    why = "CI=true" if env.get("CI") == "true" else f"{OPT_IN}={env.get(OPT_IN)}"
    return f"SLURM tests ({why}) set up this machine: {'; '.join(changes)}"


def announce(config: Any, line: str) -> None:
    """Show `line` in pytest's output while output is captured: through the terminal reporter, or
    on an xdist worker (which has no terminal) on its stderr, which the controller's terminal shows."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        if reporter is not None and not hasattr(config, "workerinput"):
            reporter.write_line(line)
        else:
            print(line, file=sys.__stderr__, flush=True)
